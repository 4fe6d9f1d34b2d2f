"""Put on the PYTHONPATH of a launched run by tests/test_deepspeed.py: records, for every model that
`from_pretrained` loads, how much of its weights this process holds right after loading (ZeRO-3
partitions as it loads, or not) and this process's peak anonymous memory during the load (sampled
every 2 ms from /proc/self/status). One JSON line per load in $LOAD_PROBE_DIR/rank<RANK>.jsonl."""

import json
import os
import threading
import time


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class _Peak:
    def __init__(self):
        self.base = self.peak = _rss_anon_kib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _rss_anon_kib())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_anon_kib())
        return (self.peak - self.base) / 1024


def _install():
    from transformers import modeling_utils

    original = modeling_utils.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        start, peak = time.perf_counter(), _Peak()
        model = original(cls, *args, **kwargs)
        mib = peak.stop()
        held = total = whole = 0
        for p in model.parameters():
            full = getattr(p, "ds_numel", p.numel())
            total += full
            held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            whole += 0 if hasattr(p, "ds_tensor") else 1
        record = {"job": os.environ.get("LOAD_PROBE_JOB"), "class": cls.__name__, "held": held, "total": total, "unpartitioned": whole,
                  "peak_mib": round(mib, 1), "seconds": round(time.perf_counter() - start, 2)}
        folder = os.environ["LOAD_PROBE_DIR"]
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return model

    modeling_utils.PreTrainedModel.from_pretrained = classmethod(from_pretrained)


if os.environ.get("LOAD_PROBE_DIR"):
    _install()
