"""Every README example runs as written, against the shipped demo files.

The README's Python blocks use a Qwen-Scope release and a GGUF model the tests cannot download;
FIXTURE replaces those names with the demo's files and numbers (the demo SAE reads layer 2 and
has 1024 features), and NAMES defines what the blocks take as given (`model`, `inputs`,
`x_tensor`, `messages`, `engine`). The blocks run in order in one namespace, as a reader pasting
them into one session would; a block that needs CUDA is skipped where there is none. The bash
block that starts with "# the command line on the shipped demo" runs as a shell script.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from saehook import demo  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# README name -> what the test runs instead (literal replacements, in this order)
FIXTURE = [
    ("SAE-Res-Qwen3.5-2B-Base-W32K-L0_50/layer12.sae.pt", demo.SAE_FILE),   # a Qwen-Scope layer file
    ("qwen3-8b-Q4_K_M.gguf", demo.MODEL),                                   # a GGUF model
    ("layer12.", "layer2."),                                                # file names that say the layer
    ("1234", "123"),                                                        # a feature the SAE has
    ("{12:", "{2:"), ("rec[12]", "rec[2]"), ("layer=12", "layer=2"), ("sae, 12,", "sae, 2,"),  # layer 12 -> 2
    ("features[12]", "features[2]"),
    ("(8, 50)", "(8, 16)"),                                                 # k in comments
]


def blocks(lang: str):
    text = open(README, encoding="utf-8").read()
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


def substitute(code: str) -> str:
    for a, b in FIXTURE:
        code = code.replace(a, b)
    return code


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """What the README's examples take as given, built from the demo."""
    import transformers

    from saehook.engines import open_engine

    os.environ.setdefault("SAEHOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
    hf_dir = demo.hf_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    return {"model": model, "inputs": tok("The with statement is used to", return_tensors="pt"),
            "x_tensor": torch.randn(8, 128), "messages": [{"role": "user", "content": "What is a with statement?"}],
            "engine": open_engine(demo.MODEL)}


def needs_cuda(code: str) -> bool:
    return "saehook.cuda" in code or "cuda:" in code


def test_the_readme_has_the_examples_this_test_runs():
    py = blocks("python")
    assert len(py) >= 6
    joined = "\n".join(py)
    for name in ("HookedLlama", "shf.capture", "ops.encode", "saehook.load", "feature_reward"):
        assert name in joined
    for a, _ in FIXTURE[:2]:
        assert a in joined  # the fixture still matches what the README says


def run_blocks(names, include_cuda: bool) -> dict:
    ns = dict(names)
    for i, code in enumerate(blocks("python")):
        if needs_cuda(code) and not include_cuda:
            continue
        exec(compile(substitute(code), f"README.md python block {i}", "exec"), ns)
    return ns


def test_python_blocks_run(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files (layer12.int8.safetensors)
    ns = run_blocks(names, include_cuda=False)
    # what the blocks computed is what they say
    sae, rec = ns["sae"], ns["rec"]
    assert ns["values"].shape == ns["indices"].shape == (8, sae.k)
    assert os.path.exists(tmp_path / "layer2.int8.safetensors")
    assert rec[2].indices.shape[1] == sae.k
    assert len(ns["reward"](["a b c", "abc"])) == 2


def test_cuda_blocks_run(names, tmp_path, monkeypatch):
    import saehook.cuda

    if not saehook.cuda.is_available():
        pytest.skip("the README's CUDA block needs a CUDA device (and a CUDA build of saehook)")
    monkeypatch.chdir(tmp_path)
    names = dict(names, h=torch.randn(8, 128, device="cuda"))  # the residual rows the CUDA block steers
    ns = run_blocks(names, include_cuda=True)
    assert ns["vals"].shape == (8, ns["sae"].k)


def test_the_demo_command_line_block_runs(tmp_path):
    script = next(b for b in blocks("bash") if b.startswith("# the command line on the shipped demo"))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               SAEHOOK_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "page.html").exists()
    assert "steered:" in r.stdout and "fve" in r.stdout
    assert "Traceback" not in r.stderr and "n_ctx_train" not in r.stderr
