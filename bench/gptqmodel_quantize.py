"""Quantize a model with gptqmodel (the maintained GPTQ library) on a saved calibration batch.

The reference point of the quality report: the same token batch (a ``.pt`` file holding a
``[num_samples, seq_len]`` LongTensor, written by ``bench/quality.py``) and the same settings as
``optgptq quantize``. Prints one JSON line with the wall-clock seconds of the quantize call.

    GPTQMODEL_CPU_WORKERS=2 python bench/gptqmodel_quantize.py --model DIR --calib-ids ids.pt \
        --out DIR --bits 4 --group-size 64 [--act-order] [--sym]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-ids", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--asym", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--mse", action="store_true", help="its clipping search (norm 2.4, as ours)")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = torch.load(a.calib_ids)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()}
                   for row in ids]
    config = QuantizeConfig(bits=a.bits, group_size=a.group_size, desc_act=a.act_order,
                            act_group_aware=False, sym=not a.asym, damp_percent=a.damp,
                            mse=2.4 if a.mse else 0.0)
    start = time.perf_counter()
    model = GPTQModel.load(a.model, config, device="cpu", dtype=torch.float32)
    model.quantize(calibration, batch_size=a.batch_size)
    seconds = time.perf_counter() - start
    model.save(a.out)
    print(json.dumps({"seconds": seconds, "out": a.out}))


if __name__ == "__main__":
    main()
