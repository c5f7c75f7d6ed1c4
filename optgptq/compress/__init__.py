"""Offline compression: calibration data (``calib``), Opt-GQA conversion (``gqa``),
quantization (``quant``), evaluation (``eval``) and their subcommands (``cli``)."""
