"""Offline compression: calibration data, GPTQ quantization, Opt-GQA conversion, evaluation."""
