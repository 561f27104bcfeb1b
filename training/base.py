"""The embedded default base: a byte-level BPE tokenizer and a small Llama
trained from scratch on MedQuAD plus the MedText train split.

Used only when the recipe names no base folder. The loop is nanoGPT-sized on
purpose: random packed blocks, AdamW, warmup then cosine, a resumable
checkpoint every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from app.clinical.prompting import CHAT_TEMPLATE, MARKER_TOKENS
from training.config import BuildSection
from training.data import medquad_texts, medtext_train_texts
from training.stages import Stage, progress_interval, write_json

EOS = "<|end|>"
PAD = "<|pad|>"


def corpus(cfg: BuildSection, train_limit: int | None) -> list[str]:
    """Pretraining documents: never a held-out MedText row (see training.data)."""
    return medquad_texts(cfg.medquad_docs) + medtext_train_texts(train_limit)


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD, *MARKER_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=PAD)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def _lr_at(step: int, cfg: BuildSection) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def build_base(stage: Stage, cfg: BuildSection, seed: int, train_limit: int | None) -> Path:
    """Train tokenizer and model; resume from ``state.pt`` in the partial folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = stage.begin()
    texts = corpus(cfg, train_limit)
    if not (work / "tokenizer.json").is_file():
        t0 = time.time()
        train_tokenizer(texts, cfg.vocab_size, work)
        print(f"[base] tokenizer: {cfg.vocab_size} tokens trained in {time.time() - t0:.1f}s")
    tok = AutoTokenizer.from_pretrained(work)

    tokens_path = work / "tokens.pt"
    if tokens_path.is_file():
        data = torch.load(tokens_path)
    else:
        ids: list[int] = []
        for batch_start in range(0, len(texts), 1000):
            enc = tok(texts[batch_start : batch_start + 1000], add_special_tokens=False)["input_ids"]
            for doc in enc:
                ids.extend(doc)
                ids.append(tok.eos_token_id)
        data = torch.tensor(ids, dtype=torch.int32)
        torch.save(data, tokens_path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state_path = work / "state.pt"
    step, history = 0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        step, history = state["step"], state["history"]
        print(f"[base] resuming at step {step}/{cfg.steps}")

    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    block = cfg.block_size
    bar = tqdm(total=cfg.steps, initial=step, desc="base pretrain", unit="step", mininterval=progress_interval())
    t0 = time.time()
    while step < cfg.steps:
        gen = torch.Generator().manual_seed(seed * 100003 + step)
        starts = torch.randint(0, len(data) - block - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + block].long() for s in starts.tolist()])
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, cfg)
        # plain fp32: bf16 autocast is ~20x slower for training on these CPUs (measured)
        out = model(input_ids=batch, labels=batch)
        loss = out.loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), "lr": _lr_at(step - 1, cfg)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save(
                {"model": model.state_dict(), "optim": optim.state_dict(), "step": step, "history": history}, tmp
            )
            tmp.replace(state_path)
    bar.close()

    model.eval()
    model.save_pretrained(work)
    tok.save_pretrained(work)
    write_json(work / "train_log.json", history)
    state_path.unlink(missing_ok=True)
    tokens_path.unlink(missing_ok=True)
    stage.finish(
        {
            "parameters": n_params,
            "tokens_in_corpus": len(data),
            "tokens_seen": cfg.steps * cfg.batch_size * block,
            "documents": len(texts),
            "seconds_this_run": round(time.time() - t0, 1),
        }
    )
    return stage.final
