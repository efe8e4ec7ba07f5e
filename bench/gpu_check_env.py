"""Parts `env` and `tests` of bench/gpu_check.py: versions, which SDPA backend runs, and the suite's CUDA tests."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_check_common import ROOT, Budget, guarded, row

SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION (CPU)",
    "aten::_scaled_dot_product_attention_math": "MATH",
}


def package_version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as e:
        return f"absent ({type(e).__name__})"
    return str(getattr(mod, "__version__", "present"))


def versions(device) -> None:
    import torch

    row("python", sys.version.split()[0])
    row("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row("device", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        row("cuDNN / NCCL", f"{torch.backends.cudnn.version()} / {'.'.join(map(str, torch.cuda.nccl.version()))}")
    else:
        row("device", "cpu (no CUDA device)")
    row("flash-attn", package_version("flash_attn") + "; no wheel for this torch/CUDA: attention runs through SDPA")
    row("bmtrain", package_version("bmtrain") + "; no wheel: env_type bmtrain is not checked here")
    row("transformers / tokenizers", f"{package_version('transformers')} / {package_version('tokenizers')}")


def sdpa_ops_run(fn) -> list[str]:
    """The SDPA implementation ops dispatched while running fn (from the profiler's op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return [label for op, label in SDPA_OPS.items() if op in names]


def sdpa_report(device) -> None:
    """Which backend `aquila.attention.attention` gets for the training shape (causal, no mask) and for a decode
    step (bool mask over the cache), and which backends accept each when forced with sdpa_kernel."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from aquila.attention import attention

    dtype = torch.bfloat16
    cases = {
        "train (causal, bf16, b2 h32 s2048 d128)": ((2, 32, 2048, 128), (2, 32, 2048, 128), None, True),
        "decode (mask, bf16, b16 h32 q1 kv256 d128)": ((16, 32, 1, 128), (16, 32, 256, 128), True, False),
    }
    if device.type != "cuda":  # smaller shapes, same code path
        cases = {k: ((1, 4, q[2] // 16 or 1, 16), (1, 4, kv[2] // 16, 16), m, c) for k, (q, kv, m, c) in cases.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (qs, kvs, masked, causal) in cases.items():
        q = torch.randn(qs, device=device, dtype=dtype, generator=gen)
        k = torch.randn(kvs, device=device, dtype=dtype, generator=gen)
        v = torch.randn(kvs, device=device, dtype=dtype, generator=gen)
        mask = None
        if masked:
            mask = torch.ones(qs[0], 1, qs[2], kvs[2], dtype=torch.bool, device=device)
            mask[..., kvs[2] // 2 :] = False

        def call(q=q, k=k, v=v, mask=mask, causal=causal):
            return attention(q, k, v, mask, causal)

        ran = sdpa_ops_run(call)
        accepted = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    call()
                accepted.append(backend.name)
            except RuntimeError:
                pass
        row(f"SDPA {name}", f"ran {', '.join(ran) or 'no SDPA op'}; also accepted: {', '.join(accepted) or 'none'}")


def env_part(args, budget: Budget) -> None:
    import torch

    device = torch.device(args.device)
    guarded("versions", lambda: versions(device))
    guarded("SDPA backend", lambda: sdpa_report(device))


def junit_rows(path: Path) -> int:
    """One row per test case of a junit XML file; returns the number of failures and errors."""
    bad = 0
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"cuda test {case.get('name')}"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        measured = "; ".join(f"{k} {v}" for k, v in props.items())
        problem = next((c for c in case if c.tag in ("failure", "error")), None)
        skipped = case.find("skipped")
        if problem is not None:
            bad += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            row(name, f"FAILED: {message[0][:240] if message else problem.tag}")
        elif skipped is not None:
            row(name, f"skipped: {(skipped.get('message') or '').strip()[:200]}")
        else:
            row(name, f"passed in {float(case.get('time', 0)):.1f} s" + (f" ({measured})" if measured else ""))
    return bad


def verbose_outcomes(out: str) -> list[tuple[str, str]]:
    """(test name, passed/failed/skipped/error) from `pytest -v` lines of the tests that finished."""
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("tests/test_cuda.py::"):
            found.append((parts[0].split("::", 1)[1], parts[1].lower()))
    return found


def tests_part(args, budget: Budget) -> None:
    """`pytest -m cuda tests/test_cuda.py`; the image's pytest, or one carried in .whl/ (bench/gpu_check.sh)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        row("cuda tests", "error: pytest is not installed: put its wheel (and pluggy, iniconfig) in .whl/ and carry it")
        return
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-rs", "-v"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}", "-o", "junit_family=xunit1"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(budget.left(), 1))
        except subprocess.TimeoutExpired as e:  # no junit file then: the verbose lines say how far it got
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            sys.stderr.write(out[-6000:])
            for name, outcome in verbose_outcomes(out):
                row(f"cuda test {name}", outcome)
            row("cuda tests", f"error: pytest stopped after {e.timeout:.0f} s (the part's time limit)")
            return
        sys.stderr.write(res.stdout[-6000:] + res.stderr[-2000:])
        if not xml.is_file():
            tail = (res.stdout + res.stderr).strip().splitlines() or ["no output"]
            row("cuda tests", f"error: pytest exit status {res.returncode}: {tail[-1][:200]}")
            return
        bad = junit_rows(xml)
        row("cuda tests", f"pytest exit status {res.returncode}, {bad} failed")
