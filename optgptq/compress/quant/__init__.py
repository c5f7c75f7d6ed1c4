"""Quantization: the methods' registry (``methods``) of settings and solvers (``quantizer`` and
``gptq`` for GPTQ and round-to-nearest, ``gptqt``, ``dgq``; ``solver`` says what they share),
the one layer-by-layer driver (``pipeline``), the one checkpoint writer and the readers
(``checkpoint``), and the ``optgptq quantize`` run."""
