"""Train the bundled demo model on the synthetic world: ``python -m ros_infmllm.demo.train --out DIR``.

A small LLaVA (SigLIP-style tower, 2-layer projector, Qwen2-style decoder, word-level tokenizer)
built and trained with `transformers` itself, so the saved folder is a genuine
``LlavaForConditionalGeneration`` checkpoint that our loader reads like any other. Episodes are
generated on the fly from seeds; the learning rate follows a cosine over the time budget, so
the same command fits an H100 (minutes) or a CPU (hours) by ``--minutes``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .episodes import EOS, IMAGE, PAD, SPECIAL_TOKENS, UNK, Episode, episode_words, make_episode
from .questions import CURRENT_TYPES, MEMORY_TYPES, vocabulary

IMAGE_SIZE, PATCH = 64, 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # strategy "full": every patch, SigLIP has no CLS token
VALIDATION_SEED = 10_000_000  # training seeds stay below this; validation and evaluation use seeds above


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_model(vocab_size: int, image_token: int, eos: int, pad: int, size: str = "base"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    width = {"base": 256, "tiny": 64}[size]
    vision = SiglipVisionConfig(hidden_size=width * 3 // 4, intermediate_size=width * 3 // 2,
                                num_hidden_layers=4 if size == "base" else 1, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH)
    text = Qwen2Config(hidden_size=width, intermediate_size=width * 3, num_hidden_layers=6 if size == "base" else 1,
                       num_attention_heads=8 if size == "base" else 2, num_key_value_heads=2,
                       vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=eos, pad_token_id=pad, rope_theta=10000.0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", image_seq_length=IMAGE_TOKENS, tie_word_embeddings=True)
    return LlavaForConditionalGeneration(config)


def normalise(frames: list[np.ndarray]) -> torch.Tensor:
    """What preprocessor_config() asks for: rescale 1/255, mean 0.5, std 0.5 (frames are rendered at the
    tower's size, so no resize)."""
    array = np.stack(frames).astype(np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def collate(episodes: list[Episode], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    rows = [episode_words(e, IMAGE_TOKENS) for e in episodes]
    length = max(len(words) for words, _ in rows)
    ids = torch.full((len(rows), length), vocab[PAD])
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (words, target) in enumerate(rows):
        row = torch.tensor([vocab.get(w, vocab[UNK]) for w in words])
        ids[i, : len(words)] = row
        mask[i, : len(words)] = 1
        keep = torch.tensor(target)
        labels[i, : len(words)] = torch.where(keep, row, torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": normalise([f for e in episodes for f in e.frames])}


class EpisodeBatches(torch.utils.data.IterableDataset):
    """Endless batches of fresh episodes; each worker draws from its own seed range."""

    def __init__(self, batch: int, max_frames: int, vocab: dict[str, int], seed: int) -> None:
        self.batch, self.max_frames, self.vocab, self.seed = batch, max_frames, vocab, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = np.random.default_rng(self.seed + 7919 * worker)
        while True:
            seeds = rng.integers(0, VALIDATION_SEED, self.batch)
            frames = rng.integers(1, self.max_frames + 1, self.batch)
            yield collate([make_episode(int(s), int(n)) for s, n in zip(seeds, frames)], self.vocab)


@torch.no_grad()
def validate(model, vocab: dict[str, int], device: str, episodes: int = 256, max_frames: int = 16) -> dict[str, float]:
    """Teacher-forced exact match of every answer, per question kind, on held-out seeds."""
    model.eval()
    correct: dict[str, list[int]] = {}
    for start in range(0, episodes, 32):
        batch_eps = [make_episode(VALIDATION_SEED + start + i, 1 + (start + i) % max_frames) for i in range(32)]
        batch = {k: v.to(device) for k, v in collate(batch_eps, vocab).items()}
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
        predicted = logits[:, :-1].argmax(-1)
        targets = batch["labels"][:, 1:]
        for row, episode in enumerate(batch_eps):
            kinds = [item.kind for kind, item in episode.events if kind == "qa"]
            for kind, group in zip(kinds, answer_spans(targets[row])):
                ok = bool((predicted[row, group] == targets[row, group]).all())
                correct.setdefault(kind, []).append(int(ok))
    model.train()
    return {kind: float(np.mean(v)) for kind, v in sorted(correct.items())}


def answer_spans(targets: torch.Tensor) -> list[list[int]]:
    """Positions of each answer in a row of shifted labels: runs of consecutive trained tokens."""
    spans: list[list[int]] = []
    for position in (targets != -100).nonzero().flatten().tolist():
        if spans and position == spans[-1][-1] + 1:
            spans[-1].append(position)
        else:
            spans.append([position])
    return spans


def preprocessor_config(size: int) -> dict:
    """The preprocessor_config.json of a demo model: resize to ``size``, rescale 1/255, mean/std 0.5."""
    return {"do_resize": True, "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}


def save(model, tokenizer, vocab: dict[str, int], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(IMAGE_SIZE), indent=1))
    (out / "infmllm_template.json").write_text(json.dumps({"template": "demo"}))
    (out / "chat_template.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}{% if m['role'] == 'user' %}{% for c in m['content'] %}"
                         "{% if c['type'] == 'image' %}<frame> <image>{% else %} <q> {{ c['text'] }} <a>{% endif %}"
                         "{% endfor %}{% else %} {{ m['content'][0]['text'] }} <eos>{% endif %}{% endfor %}"}))
    (out / "training.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ros_infmllm.demo.train", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--max-frames", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("base", "tiny"), default="base")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    parser.add_argument("--validation-episodes", type=int, default=256)
    parser.add_argument("--init", type=Path, help="continue from a checkpoint this script saved")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    if args.init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        previous = json.loads((args.init / "training.json").read_text())
    else:
        model = build_model(len(vocab), vocab[IMAGE], vocab[EOS], vocab[PAD], args.size)
        previous = None
    model = model.to(args.device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    loader = torch.utils.data.DataLoader(EpisodeBatches(args.batch, args.max_frames, vocab, args.seed),
                                         batch_size=None, num_workers=args.workers, pin_memory=True,
                                         prefetch_factor=4 if args.workers else None)
    budget = args.minutes * 60
    started = time.monotonic()
    history = []
    step = 0
    print(f"{params / 1e6:.2f} M parameters, {IMAGE_TOKENS} visual tokens per frame, budget {args.minutes} min",
          flush=True)
    for batch in loader:
        elapsed = time.monotonic() - started
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        progress = elapsed / budget
        warmup = min(1.0, step / 200)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type="cuda" if args.device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 200 == 0:
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4)})
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.4f}", flush=True)
    accuracy = validate(model, vocab, args.device, args.validation_episodes)
    print("teacher-forced exact match on held-out episodes:", json.dumps(accuracy), flush=True)
    meta = {"steps": step, "seconds": round(time.monotonic() - started, 1), "parameters": params,
            "batch": args.batch, "max_frames": args.max_frames, "lr": args.lr, "seed": args.seed,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "validation_exact_match": accuracy, "loss_history": history,
            "current_kinds": list(CURRENT_TYPES), "memory_kinds": list(MEMORY_TYPES), "continued_from": previous}
    save(model, tokenizer, vocab, args.out, meta)
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
