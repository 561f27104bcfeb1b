"""Export a published checkpoint for other runtimes: dequantized Hugging Face weights, or GGUF
for llama.cpp and Ollama.

    python -m training export model_artifacts/default --format gguf --out medask.gguf [--outtype f32]
    python -m training export model_artifacts/default --format hf --out out/medask-dense

GGUF goes through llama.cpp's own converter (``convert_hf_to_gguf.py`` and its ``gguf-py``, from
a llama.cpp source tree: ``bash benchmarks/build_llama_cpp.sh`` unpacks one to runs/llama.cpp/src),
run on the dequantized folder. Two things about our tokenizer it needs told: its pre-tokenizer
(byte-level BPE with GPT-2's split regex, a hash the converter does not list, is ``gpt-2``), and
that it has no BOS token (the chat template's BOS line is dropped, ``add_bos_token`` is false), so
llama.cpp renders and tokenizes prompts exactly as the service does.

Every output is written beside its destination and moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_LLAMA_CPP = Path("runs/llama.cpp/src")
# the chat template's first line, which would put a BOS token our tokenizer does not have
BOS_LINE = "{% if bos_token %}{{ bos_token }}{% endif %}"

# run in a fresh interpreter: the converter is a script. The pre-tokenizer it does not know (ours:
# byte-level BPE with GPT-2's regex) is named for it rather than refused, and a folder with no
# SentencePiece model is said to have none before the converter imports sentencepiece to find out
CONVERTER_SHIM = """
import sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import convert_hf_to_gguf as conv
try:  # where the converter keeps its base class: a package in newer trees, the script in older ones
    from conversion.base import TextModel as base
except ImportError:
    base = conv.TextModel
original = base.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.get_vocab_base_pre = get_vocab_base_pre
sentencepiece = base._set_vocab_sentencepiece
def _set_vocab_sentencepiece(self, *args, **kwargs):
    if not (self.dir_model / "tokenizer.model").is_file():  # ours is a tokenizer.json BPE: say so early
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
base._set_vocab_sentencepiece = _set_vocab_sentencepiece
sys.argv[0] = "convert_hf_to_gguf.py"
conv.main()
"""


class ExportError(RuntimeError):
    """The export cannot be made; the message says why."""


def dequantize(checkpoint: Path, out: Path) -> Path:
    """A plain float32 Hugging Face folder with the checkpoint's 4-bit weights dequantized (what
    GPTQ's kernels compute with), its tokenizer, and a chat template without the BOS line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.manifest import verify_checkpoint

    problems = verify_checkpoint(checkpoint)
    if problems:
        raise ExportError(f"checkpoint {checkpoint} fails verification: " + "; ".join(problems))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not hasattr(module, "qweight"):
            continue
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            # GPTQ packs W^T as (in, out): scale * (q - zero), per group along the input
            dense.weight.copy_(module.dequantize_weight().T.float())
            if module.bias is not None:
                dense.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
        replaced += 1
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.chat_template = (tokenizer.chat_template or "").replace(BOS_LINE, "")
        tokenizer.save_pretrained(tmp)
        # read by llama.cpp's converter: without it llama.cpp would put its default BOS before prompts
        config_file = tmp / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text(encoding="utf-8"))
        tok_config.update(add_bos_token=False, add_eos_token=False)
        config_file.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        (tmp / "export.json").write_text(
            json.dumps({"from": str(checkpoint), "dequantized_linears": replaced}, indent=1) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def to_gguf(dense: Path, out: Path, outtype: str = "f32", llama_cpp: Path = DEFAULT_LLAMA_CPP) -> Path:
    """Convert a dequantized folder to one GGUF file with llama.cpp's converter."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(
            f"llama.cpp's converter is not at {script}: run `bash benchmarks/build_llama_cpp.sh` "
            "(it unpacks llama.cpp's source there) or pass --llama-cpp <source folder>"
        )
    tmp = out.with_name(f".{out.name}.partial")
    cmd = [
        sys.executable,
        "-c",
        CONVERTER_SHIM,
        str(llama_cpp.resolve()),
        str(dense),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's converter failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tmp.replace(out)
    return out


def export(checkpoint: Path, fmt: str, out: Path, outtype: str = "f32", llama_cpp: Path = DEFAULT_LLAMA_CPP) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        return dequantize(checkpoint, out)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as work:
        dense = dequantize(checkpoint, Path(work) / "dense")
        return to_gguf(dense, out, outtype, llama_cpp)


def gguf_metadata(path: Path, llama_cpp: Path = DEFAULT_LLAMA_CPP) -> dict[str, Any]:
    """A few fields of a GGUF file's header (architecture, tokenizer, BOS), read with gguf-py."""
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader  # type: ignore[import-not-found]

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key in ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token"):
        field = reader.fields.get(key)
        if field is not None:
            out[key] = field.contents()
    out["tensors"] = len(reader.tensors)
    return out
