"""Load PERFT exports the way a user without perft does, in a child Python where ``perft_cli`` cannot be imported.

The child runs ``python -I -S`` (no PYTHONPATH, no user site, no ``.pth`` import hooks such as an editable install's)
from a fresh temporary directory; the interpreter's site-packages are added back as plain path entries, and a
meta-path blocker makes ``import perft_cli`` fail even where perft is installed normally. The child asserts that
``import perft_cli`` fails, then for each export: ``from_pretrained(DIR)`` without remote code must raise,
``from_pretrained(DIR, trust_remote_code=True)`` must load the shipped ``modeling_perft.py``, and its float32 logits
on the given prompts (tokenized by the export's own tokenizer) are sent back. One child checks many exports.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import torch

from perft_cli.errors import PerftError

CHILD = r"""
import importlib.abc, json, os, sys
sys.path.extend(json.loads(sys.argv[2]))

class _NoPerft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "perft_cli" or name.startswith("perft_cli."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _NoPerft())
try:
    import perft_cli  # noqa: F401
    raise SystemExit("perft_cli is importable in the isolated process")
except ModuleNotFoundError:
    pass

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)

job = json.loads(open(sys.argv[1]).read())
results, tensors = [], {}
for i, export in enumerate(job["exports"]):
    res = {"export": export}
    try:
        AutoModelForCausalLM.from_pretrained(export)
        res["refused"] = None
    except Exception as e:  # transformers: ValueError asking for trust_remote_code=True
        res["refused"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)  # reads config.json: perft_moe
    batch = tok(job["texts"], return_tensors="pt", padding=True, truncation=True, max_length=job["max_length"])
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits  # [B, S, V]
    tensors[f"logits.{i}"] = logits.float()[batch["attention_mask"].bool()].contiguous()  # [P, V]
    tensors[f"input_ids.{i}"] = batch["input_ids"].contiguous()
    res["class"] = f"{type(model).__module__}.{type(model).__name__}"
    res["module_file"] = sys.modules[type(model).__module__].__file__
    res["dtype"] = str(next(p for n, p in model.named_parameters() if "perft_" not in n).dtype).removeprefix("torch.")
    results.append(res)
    del model
leaked = sorted(m for m in sys.modules if m == "perft_cli" or m.startswith("perft_cli."))
save_file(tensors, os.path.join(job["workdir"], "logits.safetensors"))
json.dump({"results": results, "perft_cli_modules": leaked, "sys_path": sys.path}, open(job["result"], "w"))
"""


def _site_dirs() -> list[str]:
    """Where torch and transformers live for this interpreter (the child gets them without running .pth files)."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]  # a user site, if in use
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def isolated_logits(
    exports: list[Path], texts: list[str], max_length: int, timeout: float = 600
) -> list[dict[str, Any]]:
    """Load every export in one perft-free child process. Per export: refused, class, module_file, logits [P, V]."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="perft-isolated-") as work:
        job = {
            "exports": [str(Path(e).resolve()) for e in exports],
            "texts": list(texts),
            "max_length": max_length,
            "workdir": work,
            "result": os.path.join(work, "result.json"),
        }
        Path(work, "job.json").write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PERFT_"))}
        # The remote module is copied into a module cache of the child's own, never the user's; nothing is fetched.
        env.update(HF_MODULES_CACHE=os.path.join(work, "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-I", "-S", "-c", CHILD, os.path.join(work, "job.json"), json.dumps(_site_dirs())]
        try:
            done = subprocess.run(
                cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise PerftError(f"loading the export with plain transformers took over {timeout:.0f} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["(no output)"])[-1]
            raise PerftError(f"the export does not load with plain transformers (no perft): {last}")
        report = json.loads(Path(job["result"]).read_text())
        tensors = load_file(os.path.join(work, "logits.safetensors"))
    if report["perft_cli_modules"]:
        raise PerftError(f"perft_cli was imported while loading the export: {report['perft_cli_modules'][:3]}")
    out = []
    for i, res in enumerate(report["results"]):
        extra = {"sys_path": report["sys_path"], "perft_cli_modules": report["perft_cli_modules"]}
        out.append({**res, **extra, "logits": tensors[f"logits.{i}"], "input_ids": tensors[f"input_ids.{i}"]})
    return out


def check_isolated(res: dict[str, Any], reference: torch.Tensor, input_ids: torch.Tensor, rtol: float) -> dict:
    """The child's result for one export against the unmerged model's logits [P, V] on the same token ids."""
    scale = float(reference.abs().max().clamp_min(1e-6))
    out = {
        "refused_without_remote_code": res["refused"],
        "loaded_class": res["class"],
        "perft_cli_importable": False,
        "max_abs_logit_diff": None,
        "tolerance": rtol * scale,
    }
    failure = None
    if res["refused"] is None:
        failure = "AutoModelForCausalLM.from_pretrained(OUT) without trust_remote_code loaded a model; it must refuse"
    elif not torch.equal(res["input_ids"], input_ids.cpu()):
        failure = "the exported tokenizer encodes the sample prompts differently"
    elif res["logits"].shape != reference.shape:
        failure = f"plain transformers gives logits of shape {tuple(res['logits'].shape)}"
    else:
        diff = float((res["logits"] - reference).abs().max())
        out["max_abs_logit_diff"] = diff
        if not diff <= out["tolerance"]:
            failure = (
                f"loaded with plain transformers (no perft), the export's logits differ from the unmerged model by "
                f"{diff:.3g} > {out['tolerance']:.3g}"
            )
    out["passed"], out["failure"] = failure is None, failure
    return out
