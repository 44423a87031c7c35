"""Where compression's time goes: the model's decode steps alone, the coder alone, both (one H100)."""
import sys, time, json
import numpy as np, torch, constriction
from megabyte.config import config_from_dict
from megabyte.model import build_model
from megabyte.compression import _BatchSteps, _Precision, _family, compress, decompress
from megabyte.pretrained import Pretrained
import yaml
cfg = yaml.safe_load(open("configs/bench/quality/text-megabyte-p2.yaml"))["model"]["arch"]
cfg["init_args"]["max_seq_len"] = 4096
dev = torch.device("cuda")
rows_list, steps = [256, 1024], 512
for dtype in (torch.float32, torch.bfloat16):
    model = build_model(config_from_dict(cfg)).to(dev, dtype).eval()
    for rows in rows_list:
        with _Precision("high", dev):
            b = _BatchSteps(model, rows, dev)
            byte = np.zeros(rows, dtype=np.int64)
            for t in range(1, 65): b.advance(t, byte); b.probabilities()
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for t in range(65, 65 + steps): b.advance(t, byte); b.probabilities()
            torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / steps
        print(f"model steps {dtype} rows {rows}: {dt*1e3:.3f} ms/step -> {rows/dt:,.0f} bytes/s", flush=True)
        del b; torch.cuda.empty_cache()
fam = _family()
for rows in rows_list:
    p = torch.softmax(torch.randn(rows, 256) * 3, -1).numpy().astype(np.float32)
    sym = np.random.randint(0, 256, rows).astype(np.int32)
    enc = constriction.stream.queue.RangeEncoder()
    t0 = time.perf_counter()
    for _ in range(200): enc.encode(sym, fam, p)
    de = (time.perf_counter() - t0) / 200
    dec = constriction.stream.queue.RangeDecoder(enc.get_compressed())
    t0 = time.perf_counter()
    for _ in range(200): dec.decode(fam, p)
    dd = (time.perf_counter() - t0) / 200
    print(f"coder rows {rows}: encode {de*1e3:.3f} ms/step, decode {dd*1e3:.3f} ms/step -> {rows/max(de,dd):,.0f} bytes/s", flush=True)
data = open("/tmp/x.bin", "rb").read() if len(sys.argv) > 2 else bytes(np.random.randint(32, 127, 4096 * 256, dtype=np.uint8))
for dtype in ("float32", "bfloat16"):
    model = build_model(config_from_dict(cfg)).to(dev, getattr(torch, dtype)).eval()
    pre = Pretrained(model, {"class_path": "datamodules.TextDataModule", "init_args": {"path": "x", "seq_len": 4096}})
    compress(pre, data[: 4096 * 4], batch_size=4)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    blob = compress(pre, data, batch_size=256); torch.cuda.synchronize(); tc = time.perf_counter() - t0
    t0 = time.perf_counter(); out = decompress(pre, blob); torch.cuda.synchronize(); td = time.perf_counter() - t0
    print(f"compress {dtype} {len(data):,} bytes batch 256: {len(data)/tc:,.0f} B/s, decompress {len(data)/td:,.0f} B/s, exact {out == data}", flush=True)
