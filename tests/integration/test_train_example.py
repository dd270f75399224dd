"""scripts/train_example.py: a real PyTorch model trained from the fabric resumes bitwise.

The end-to-end test runs ``--check-resume`` (its own local daemon, a generated corpus): K steps
uninterrupted, then to step k, checkpoint, resume in a new process, and both loss curves must be
bitwise equal. The fast tests check the pieces that verdict rests on: the curve comparison sees a
one-ulp difference, and the masked attention equals attention computed sequence by sequence.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (it is the `train` extra: pip install -e '.[train]')")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_example.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_example"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


te = _load_script()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_check_resume_gives_bitwise_equal_loss_curves(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check-resume", "--steps", "6", "--resume-at", "2",
                           "--workdir", str(work)],
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[0])
    assert result["identical"] is True
    assert (result["steps"], result["resumed_at"]) == (6, 2)
    assert result["tokens_per_s"] > 0
    # it really trained: from about ln(vocab) (a uniform guess) down
    assert abs(result["first_loss"] - math.log(result["vocab_size"])) < 0.5  # an untrained model guesses
    assert result["last_loss"] < result["first_loss"] - 0.5
    assert "resumed from" in proc.stderr and "subscribing" in proc.stderr
    # nothing it started outlived it (the daemon and its roles run with paths under --workdir)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or ())]
    assert not left, f"processes left running: {left}"


@pytest.mark.unit
def test_curve_comparison_sees_one_ulp():
    curve = [5.664083480834961, 4.902318954467773, 3.461174726486206]
    assert te.first_difference(curve, list(curve)) is None
    bumped = list(curve)
    bumped[1] = math.nextafter(curve[1], math.inf)
    assert abs(bumped[1] - curve[1]) < 1e-15  # any tolerance-based check would call these equal
    assert te.first_difference(curve, bumped) == 1
    assert te.first_difference(curve, curve[:2]) == 2  # a curve cut short is not identical either
    assert te.first_difference([0.0], [-0.0]) == 0


@pytest.mark.unit
def test_masked_attention_stays_inside_each_sequence():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, heads, dim = sum(lengths), 2, 8
    q, k, v = (torch.randn(total, heads, dim) for _ in range(3))
    got = te.SequenceAttention(cu, total, flash=False)(q, k, v)
    # independently: plain causal softmax attention over each sequence alone
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) / math.sqrt(dim)
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        want = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b])
        torch.testing.assert_close(got[a:b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_vocab_size_comes_from_the_flag_the_tokenizer_file_or_the_byte_tokenizer(tmp_path, monkeypatch):
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}},
                               "added_tokens": [{"id": 7, "content": "<eos>", "special": True}]}))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # the file is read without the package
    assert te.vocab_size(te.parse_args(["--tokenizer", str(tok)])) == 8
    assert te.vocab_size(te.parse_args(["--tokenizer", str(tok), "--vocab-size", "300"])) == 300
    assert te.vocab_size(te.parse_args([])) == te.VOCAB_SIZE == 259
