"""`python -m training export`: dequantized weights that compute what the 4-bit kernels compute,
and a GGUF file llama.cpp reads with our tokenizer's facts (no BOS, GPT-2 pre-tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_training
from training.export import BOS_LINE, DEFAULT_LLAMA_CPP, dequantize, gguf_metadata


def test_dequantized_weights_give_the_checkpoints_logits(ci_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir = dequantize(ci_checkpoint, tmp_path / "dense")
    config = json.loads((dense_dir / "config.json").read_text())
    assert "quantization_config" not in config
    tok_config = json.loads((dense_dir / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False
    assert BOS_LINE not in AutoTokenizer.from_pretrained(dense_dir).chat_template
    assert json.loads((dense_dir / "export.json").read_text())["dequantized_linears"] > 0

    tok = AutoTokenizer.from_pretrained(ci_checkpoint)
    ids = torch.tensor([tok("A patient with fever and a cough since Monday.", add_special_tokens=False)["input_ids"]])
    quantized = AutoModelForCausalLM.from_pretrained(ci_checkpoint, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    assert not any(hasattr(m, "qweight") for m in dense.modules())
    with torch.inference_mode():
        a, b = quantized(input_ids=ids).logits, dense(input_ids=ids).logits
    # the kernel multiplies in bfloat16; the dense weights are the same numbers in float32
    assert torch.allclose(a, b, atol=0.05, rtol=0.01), float((a - b).abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.skipif(
    not (ROOT / DEFAULT_LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
    reason="llama.cpp source not unpacked (`SOURCE_ONLY=1 bash benchmarks/build_llama_cpp.sh`; .ci/run does it)",
)
def test_gguf_export_through_llama_cpps_converter(ci_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "medask.gguf"
    proc = run_training("export", str(ci_checkpoint), "--format", "gguf", "--out", str(out))
    assert "exported" in proc.stdout
    meta = gguf_metadata(out, ROOT / DEFAULT_LLAMA_CPP)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    config = json.loads((ci_checkpoint / "config.json").read_text())
    # embeddings, final norm, LM head, and 9 tensors per layer (4 attention, 3 MLP, 2 norms)
    assert meta["tensors"] == 3 + 9 * config["num_hidden_layers"]
    assert not list(tmp_path.glob(".*")), "a partial file was left behind"


def test_export_refuses_a_checkpoint_that_fails_verification(ci_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(ci_checkpoint, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    proc = run_training("export", str(broken), "--format", "hf", "--out", str(tmp_path / "dense"), check=False)
    assert proc.returncode == 2 and "fails verification" in proc.stderr
    assert not (tmp_path / "dense").exists()
