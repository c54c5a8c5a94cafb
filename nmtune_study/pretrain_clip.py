"""Contrastive (CLIP) pre-training with noisy image-text pairs, on open_clip.

Offline default: a small CLIP (a ViT image tower on 32x32 glyphs and a 2-layer text
transformer, :data:`MODEL_CONFIG`) built by open_clip's own factory from a model
config registered with ``open_clip.add_model_config``, trained with open_clip's
``ClipLoss`` on the captions tokenised by open_clip's tokenizer (its BPE vocabulary
ships in the wheel; nothing is downloaded), on the offline pairs of
``nmtune_study.data.clip`` with a fraction gamma of the captions swapped
(``noisy_shards.swap_captions``). A checkpoint is written after every epoch (and,
with ``--checkpoint-every-steps N``, every N optimizer steps with the position in
the epoch) and resumed automatically, mid-epoch too: a SIGKILL and a rerun give
bit-identical weights (:mod:`nmtune_study.train_loop`, shared with ``pretrain.py``). Every
epoch logs the contrastive loss and the zero-shot accuracy on the clean validation
split::

    python examples/pretrain_clip.py --gamma 0.1 --seed 0 --out runs/clip/g10_s0

Paper scale (CC12M / YFCC15M webdataset shards made noisy by ``noisy_shards.py``)
is trained by open_clip's own trainer; write the model folder once, then run
``open_clip_train.main`` under torchrun (see ``docs/contrastive.md``)::

    python examples/pretrain_clip.py write-config runs/clip-config --preset ViT-B-32
    torchrun --nproc_per_node 8 -m open_clip_train.main \\
        --model local-dir:runs/clip-config --train-data '/data/cc12m-noisy/g10/{00000..01242}.tar' \\
        --dataset-type webdataset --train-num-samples 10968539 --batch-size 512 --epochs 32 \\
        --lr 5e-4 --wd 0.2 --warmup 2000 --precision amp --workers 8 --save-frequency 1 \\
        --logs runs/clip-logs --name cc12m_g10 --seed 0

:func:`load_open_clip_checkpoint` reads the resulting ``epoch_K.pt`` into a model for
``contrastive.py``'s evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Sequence

import torch

from nmtune_study import noisy_shards as ns
from nmtune_study import train_loop as tl
from nmtune_study.common import atomic_save, hit_rate, noise_ratio, positive_int
from nmtune_study.data import clip as cd

__all__ = ["MODEL_NAME", "MODEL_CONFIG", "PRESETS", "ClipPretrainConfig", "register_model_config",
           "write_config_parser", "write_model_dir", "build_clip", "get_tokenizer", "to_clip_input", "encode_images",
           "zero_shot_weights", "zero_shot_accuracy", "caption_memorisation", "pretrain_clip", "load_clip",
           "load_open_clip_checkpoint", "main", "parser", "run"]

MODEL_NAME = "nmtune-glyph-clip"
#: The offline model: a ViT-style image tower on 32x32 inputs (4x4 patches of 8 px)
#: and a small text transformer; open_clip's own classes, only smaller.
MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
#: Model configs for ``write-config`` besides open_clip's own names (ViT-B-32, RN50, ...).
PRESETS = {"glyph": MODEL_CONFIG}


def _open_clip():
    try:
        import open_clip
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError('the contrastive regime needs open_clip: pip install "nmtune[clip]"') from err
    return open_clip


def register_model_config(name: str = MODEL_NAME, config: dict[str, Any] | None = None) -> str:
    """Register ``config`` under ``name`` with ``open_clip.add_model_config`` (a JSON
    file in a temporary folder) and return the name.

    Example:
        >>> import open_clip
        >>> register_model_config() in open_clip.list_models()
        True
    """
    open_clip = _open_clip()
    folder = pathlib.Path(tempfile.gettempdir()) / f"nmtune-open-clip-configs-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(config or MODEL_CONFIG, indent=1)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    open_clip.add_model_config(path)
    return name


def write_model_dir(folder: str | os.PathLike, config: dict[str, Any] | None = None) -> pathlib.Path:
    """Write ``open_clip_config.json`` so that ``--model local-dir:FOLDER`` builds this model
    in ``open_clip_train.main`` (no weights in the folder: random initialisation).

    Example:
        >>> d = write_model_dir(tempfile.mkdtemp())
        >>> (d / "open_clip_config.json").exists()
        True
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": config or MODEL_CONFIG,
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def build_clip(config: dict[str, Any] | None = None, *, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised CLIP from open_clip's factory (no download).

    Example:
        >>> m = build_clip()
        >>> tuple(m.encode_image(torch.zeros(2, 3, 32, 32)).shape)
        (2, 64)
    """
    name = register_model_config(config=config) if config is not None else register_model_config()
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: none are wanted
    try:
        return _open_clip().create_model(name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)


def get_tokenizer(config: dict[str, Any] | None = None, *, context_length: int | None = None):
    """open_clip's tokenizer for the model config (its bundled BPE vocabulary).

    Example:
        >>> tuple(get_tokenizer()(["the letter A"]).shape)
        (1, 24)
    """
    name = register_model_config(config=config) if config is not None else register_model_config()
    return _open_clip().get_tokenizer(name, context_length=context_length)


def to_clip_input(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` grey images ``(B, 1, H, W)`` (or normalised floats) -> ``(B, 3, H, W)`` in [-1, 1].

    Example:
        >>> to_clip_input(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)).shape
        torch.Size([1, 3, 2, 2])
    """
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Frozen image-tower features (``encode_image``, not normalised) of uint8 images."""
    was = model.training
    model.eval()
    out = torch.cat([model.encode_image(to_clip_input(images[i:i + batch_size]))
                     for i in range(0, len(images), batch_size)])
    model.train(was)
    return out


@torch.no_grad()
def zero_shot_weights(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Class embeddings ``(C, D)``: the normalised mean of each class's normalised prompt embeddings."""
    was = model.training
    model.eval()
    flat = [p for ps in prompts for p in ps]
    emb = torch.nn.functional.normalize(model.encode_text(tokenizer(flat)), dim=-1)
    emb = emb.view(len(prompts), -1, emb.shape[-1]).mean(1)
    model.train(was)
    return torch.nn.functional.normalize(emb, dim=-1)


def zero_shot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Accuracy of ``argmax`` cosine similarity to the class embeddings.

    Example:
        >>> zero_shot_accuracy(torch.eye(2), torch.tensor([0, 1]), torch.eye(2))
        1.0
    """
    logits = torch.nn.functional.normalize(image_features, dim=-1) @ weights.T
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def caption_memorisation(model: torch.nn.Module, tokenizer, images: torch.Tensor, noisy_captions: Sequence[str],
                         clean_captions: Sequence[str], swapped: torch.Tensor, *, batch_size: int = 512
                         ) -> dict[str, float]:
    """The contrastive analogue of memorisation: caption retrieval over the training set.

    Every training image ranks every distinct training caption by cosine similarity.
    A swapped pair (its caption replaced by another image's) is *memorised* when the
    image's top-ranked caption is the swapped-in caption it was trained with, and
    still *clean* when it is the image's own caption; an unswapped pair is fitted when
    its top caption is its own. Identical texts are one caption, so an image whose swapped-in
    caption happens to equal its own (same character, font and template) counts as both.

    Returns:
        ``memorised`` (fraction of swapped pairs), ``flipped_clean`` (fraction of swapped
        pairs retrieving their own caption), ``unflipped_accuracy`` (fraction of unswapped
        pairs retrieving their caption), ``num_captions`` (distinct captions ranked).
    """
    n = len(noisy_captions)
    if len(clean_captions) != n or len(images) != n or swapped.shape != (n,):
        raise ValueError(f"images, noisy_captions, clean_captions and swapped must all have {n} rows; got "
                         f"{len(images)}, {n}, {len(clean_captions)}, {tuple(swapped.shape)}")
    texts = sorted(set(noisy_captions) | set(clean_captions))
    index = {t: i for i, t in enumerate(texts)}
    was = model.training
    model.eval()
    txt = torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)])
    txt = torch.nn.functional.normalize(txt, dim=-1)
    img = torch.nn.functional.normalize(encode_images(model, images, batch_size=batch_size), dim=-1)
    model.train(was)
    top = torch.cat([(img[i:i + batch_size] @ txt.T).argmax(-1) for i in range(0, n, batch_size)])
    noisy_idx = torch.tensor([index[t] for t in noisy_captions])
    clean_idx = torch.tensor([index[t] for t in clean_captions])
    swapped = swapped.bool()
    k, kept = int(swapped.sum()), int((~swapped).sum())
    return {"memorised": hit_rate((top == noisy_idx) & swapped, k),
            "flipped_clean": hit_rate((top == clean_idx) & swapped, k),
            "unflipped_accuracy": hit_rate((top == noisy_idx) & ~swapped, kept), "num_captions": len(texts)}


@dataclasses.dataclass(frozen=True)
class ClipPretrainConfig:
    """The offline CLIP recipe (AdamW, linear warm-up then cosine, as open_clip_train).

    ``gamma`` is the fraction of swapped pairs; ``seed`` seeds the model, the batch
    order and (``seed + 1000``) the swap."""

    gamma: float = 0.0
    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0


def _noisy_captions(pairs: cd.ClipPairs, gamma: float, seed: int) -> tuple[list[str], dict[str, Any]]:
    noisy, manifest = ns.swap_captions(list(zip(range(len(pairs.captions)), pairs.captions)), gamma, seed=seed)
    swaps = manifest["swaps"]
    # a swapped caption can still name the same character (another rendering of it)
    manifest["other_character"] = sum(int(pairs.labels[i] != pairs.labels[j]) for i, j in swaps)
    return [c for _, c in noisy], manifest


def _train_epoch(model, loss_fn, optimizer, scheduler, images, tokens, batch_size, generator,
                 ckpt: tl.Checkpointer, epoch: int, history: list[dict[str, Any]], resumed: tl.Position) -> float:
    """One epoch from the batch ``resumed`` reached in it on (0 unless resuming a step checkpoint of this epoch)."""
    model.train()
    ckpt.begin_epoch()
    order = torch.randperm(len(tokens), generator=generator)  # drawn whole, also when resuming mid-epoch
    n_batches = max(1, len(tokens) // batch_size)
    first, part = resumed.in_epoch(epoch)
    total = part.get("loss_sum", torch.zeros(()))
    for b in range(first, n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        img_f, txt_f, scale = model(to_clip_input(images[idx]), tokens[idx])
        loss = loss_fn(img_f, txt_f, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # as open_clip_train: clamp the temperature to 100
            model.logit_scale.clamp_(0, math.log(100))
        total += loss.detach()
        ckpt.after_step(epoch, b + 1, history, {"loss_sum": total})
    return float(total) / n_batches


def pretrain_clip(
    pairs: cd.ClipPairs,
    val: tuple[torch.Tensor, torch.Tensor, str],
    out_dir: str | os.PathLike,
    config: ClipPretrainConfig = ClipPretrainConfig(),
    *,
    stop_after: int | None = None,
    progress: bool = False,
    checkpoint_every_steps: int | None = None,
) -> dict[str, Any]:
    """Pre-train the offline CLIP on ``pairs`` with a fraction ``config.gamma`` of swapped captions.

    Writes ``checkpoint.pt`` after every epoch and every ``checkpoint_every_steps``
    optimizer steps (resumed automatically, mid-epoch too), ``swaps.json``
    (the manifest of swapped pairs), ``model.pt`` when finished and ``metrics.json``.

    Args:
        pairs: clean image-caption pairs (``data.clip.offline_pairs``).
        val: clean validation ``(images, labels, chars)`` for zero-shot accuracy.
        out_dir: output folder.
        config: the recipe.
        stop_after: stop after this many epochs in this call (the next call resumes).
        progress: print one line per epoch.
        checkpoint_every_steps: also checkpoint every this many optimizer steps
            (global count); None: after each epoch only. It does not change the result.

    Returns:
        ``metrics.json``'s content: ``history`` (per epoch ``loss``, ``zeroshot_val``),
        ``finished``, ``num_swapped``, ``seconds`` (wall) and ``cpu_seconds`` of this call.

    Example:
        >>> m = pretrain_clip(cd.offline_pairs(tiny=True), cd.offline_val(tiny=True), "/tmp/c",
        ...                   ClipPretrainConfig(epochs=1))  # doctest: +SKIP
    """
    tl.check_every_steps(checkpoint_every_steps, "checkpoint_every_steps")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    tl.seed_everything(config.seed)
    captions, manifest = _noisy_captions(pairs, config.gamma, config.seed + 1000)
    swapped = torch.zeros(len(captions), dtype=torch.bool)
    swapped[[i for i, _ in manifest["swaps"]]] = True
    (out / "swaps.json").write_text(json.dumps(manifest))
    model = build_clip(seed=config.seed)
    tokenizer = get_tokenizer()
    tokens = tokenizer(captions)
    loss_fn = _open_clip().ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr, fused=True)
    per_epoch = max(1, len(tokens) // config.batch_size)
    scheduler = tl.warmup_cosine_scheduler(optimizer, epochs=config.epochs, steps_per_epoch=per_epoch,
                                           warmup_epochs=config.warmup_epochs)
    generator = torch.Generator().manual_seed(config.seed)
    ckpt = tl.Checkpointer(out / "checkpoint.pt", dataclasses.asdict(config), model=model, optimizer=optimizer,
                           scheduler=scheduler, generator=generator, steps_per_epoch=per_epoch,
                           every_steps=checkpoint_every_steps, map_location="cpu",
                           log=(lambda line: print(line, flush=True)) if progress else None)
    resumed = ckpt.resume()
    history = resumed.history
    vx, vy, vchars = val
    prompts = cd.class_prompts(vchars)
    for epoch in tl.epochs_of_call(resumed, config.epochs, stop_after):
        loss = _train_epoch(model, loss_fn, optimizer, scheduler, pairs.images, tokens, config.batch_size, generator,
                            ckpt, epoch, history, resumed)
        zs = zero_shot_accuracy(encode_images(model, vx), vy, zero_shot_weights(model, tokenizer, prompts))
        history.append({"epoch": epoch + 1, "loss": loss, "zeroshot_val": zs,
                        "logit_scale": float(model.logit_scale.detach().exp()),
                        **caption_memorisation(model, tokenizer, pairs.images, captions, pairs.captions, swapped)})
        ckpt.end_epoch(epoch, history)
        if progress:
            print(f"[clip g={config.gamma:g} s={config.seed}] epoch {epoch + 1}: loss {loss:.4f} "
                  f"zero-shot val {zs:.4f}", flush=True)
    finished = bool(history) and history[-1]["epoch"] >= config.epochs
    last = history[-1] if history else {}
    metrics = {"gamma": config.gamma, "seed": config.seed, "finished": finished, "history": history,
               **{k: last.get(k, float("nan")) for k in ("memorised", "flipped_clean", "unflipped_accuracy")},
               "num_pairs": len(tokens), "num_swapped": manifest["num_swapped"],
               "swapped_other_character": manifest["other_character"],
               "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
               "config": dataclasses.asdict(config)}
    if finished:
        atomic_save({"model": model.state_dict(), "model_config": MODEL_CONFIG, "gamma": config.gamma,
                      "seed": config.seed}, out / "model.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def load_clip(path: str | os.PathLike) -> torch.nn.Module:
    """Load ``model.pt`` written by :func:`pretrain_clip` (eval mode)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_clip(state["model_config"])
    model.load_state_dict(state["model"])
    return model.eval()


def load_open_clip_checkpoint(checkpoint: str | os.PathLike, model: str) -> torch.nn.Module:
    """Load an ``open_clip_train`` checkpoint (``logs/NAME/checkpoints/epoch_K.pt``) into
    a model built by open_clip's factory from ``model`` (a registered name or
    ``local-dir:FOLDER``, as passed to ``--model``); DDP's ``module.`` prefix is dropped.

    Example:
        >>> m = load_open_clip_checkpoint("runs/logs/g10/checkpoints/epoch_32.pt",
        ...                               "local-dir:runs/clip-config")  # doctest: +SKIP
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd = state.get("state_dict", state) if isinstance(state, dict) else state
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net = _open_clip().create_model(model, pretrained=None)
    net.load_state_dict(sd)
    return net.eval()



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--gamma", type=noise_ratio, default=0.0, help="fraction of swapped pairs (0.1 = 10%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=ClipPretrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=ClipPretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=ClipPretrainConfig.lr)
    p.add_argument("--per-font", type=positive_int, default=None,
                   help="renderings per character and font (offline pairs; default 2, the faithful study uses 4)")
    p.add_argument("--tiny", action="store_true")
    tl.add_resume_arguments(p)
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line and pre-train (or, with ``write-config``, write an open_clip model folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["write-config"]:
        return _write_config(argv[1:])
    a = parser().parse_args(argv)
    cfg = ClipPretrainConfig(gamma=a.gamma, seed=a.seed, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr)
    return pretrain_clip(cd.offline_pairs(tiny=a.tiny, per_font=a.per_font), cd.offline_val(tiny=a.tiny), a.out, cfg,
                         stop_after=a.stop_after, progress=True, checkpoint_every_steps=a.checkpoint_every_steps)


def write_config_parser() -> argparse.ArgumentParser:
    """The arguments of ``pretrain_clip.py write-config``."""
    p = argparse.ArgumentParser(prog="pretrain_clip.py write-config")
    p.add_argument("folder")
    p.add_argument("--preset", default="glyph", help=f"one of {sorted(PRESETS)} or an open_clip model name")
    return p


def _write_config(argv: list[str]) -> dict[str, Any]:
    a = write_config_parser().parse_args(argv)
    cfg = PRESETS.get(a.preset) or _open_clip().get_model_config(a.preset)
    if cfg is None:
        raise ValueError(f"unknown preset {a.preset!r}; expected one of {sorted(PRESETS)} or an open_clip model")
    return {"folder": a.folder, "model_dir": str(write_model_dir(a.folder, cfg))}


def main(argv: list[str] | None = None) -> int:
    """``python examples/pretrain_clip.py``, ``python -m nmtune_study.pretrain_clip``: :func:`run`, then print
    the metrics without the history (or the model folder written); exit status 0."""
    res = run(argv)
    print(res["model_dir"] if "model_dir" in res else json.dumps({k: v for k, v in res.items() if k != "history"},
                                                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
