"""Opt-GQA conversion: query heads grouped (``grouping``), their K/V heads merged (``merge``) and
written back (``arch``) layer by layer (``convert``), the K/V head count chosen for a memory
budget (``auto``), recovery by distillation (``recover``), and the ``optgptq convert`` run."""
