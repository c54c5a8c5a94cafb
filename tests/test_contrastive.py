"""The contrastive (CLIP) regime end to end at test size (nmtune_study.contrastive and friends)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from nmtune_study import contrastive
from nmtune_study import evaluate as ev
from nmtune_study import noisy_shards as ns
from nmtune_study import pretrain_clip as pc
from nmtune_study import train_loop as tl
from nmtune_study.data import clip as cd
from test_contrastive_shards import write_shards

ROOT = pathlib.Path(__file__).resolve().parents[1]

RECORD_KEYS = {"gamma", "method", "kind", "task", "domain", "seed", "fraction", "accuracy", "macro_f1", "sve", "lsvr",
               "pretrain_seed", "regime"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_captions_name_character_case_font_and_style():
    pairs = cd.offline_pairs(tiny=True)
    assert len(set(pairs.captions)) > len(pairs.captions) // 2  # varied templates, not one string per class
    for cap, y, f in zip(pairs.captions, pairs.labels, pairs.fonts):
        ch, (family, style) = pairs.chars[int(y)], cd.font_description(cd.FONTS[int(f)])
        assert cd.describe(ch) in cap and family in cap and style in cap
    # every caption of the default set fits the context: the tokenizer would cut the rest silently
    tok = pc._open_clip().get_tokenizer("ViT-B-32")(cd.offline_pairs().captions)  # context 77
    assert int((tok != 0).sum(1).max()) <= pc.MODEL_CONFIG["text_cfg"]["context_length"]


def test_pretrain_clip_command_takes_the_studys_renderings_per_font(tmp_path, monkeypatch, capsys):
    """``pretrain_clip.py --per-font N`` trains on the pairs the study's CLIP profile uses
    (``offline_pairs(per_font=N)``); a non-positive count is refused before any work."""
    seen = {}

    def fake_pretrain(pairs, val, out, cfg, **kw):
        seen.update(n=len(pairs.captions), gamma=cfg.gamma)
        return {}

    monkeypatch.setattr(pc, "pretrain_clip", fake_pretrain)
    pc.run(["--tiny", "--per-font", "3", "--gamma", "0.3", "--out", str(tmp_path)])
    assert seen == {"n": len(cd.offline_pairs(tiny=True, per_font=3).captions), "gamma": 0.3}
    assert seen["n"] == 3 * len(cd.offline_pairs(tiny=True, per_font=1).captions)
    with pytest.raises(SystemExit):
        pc.run(["--tiny", "--per-font", "0", "--out", str(tmp_path)])
    assert "--per-font: expected a positive whole number; got '0'" in capsys.readouterr().err
    assert seen["n"] == 3 * len(cd.offline_pairs(tiny=True, per_font=1).captions)  # nothing ran again


@pytest.mark.slow
def test_tiny_regime_end_to_end_records_figures_and_skip_on_rerun(tmp_path):
    settings = ev.TuneSettings(seeds=(0,), epochs=2)
    res = contrastive.run_regime(tmp_path, tiny=True, gammas=(0.0, 0.3), pretrain_seeds=(0,), settings=settings)
    recs = res["records"]
    assert recs and all(RECORD_KEYS <= set(r) for r in recs)
    tuned = [r for r in recs if r["method"] != "zeroshot"]
    assert all({"protocol", "lr", "train_loss"} <= set(r) for r in tuned)  # the downstream protocol of each fit
    assert all(set(r) == RECORD_KEYS for r in recs if r["method"] == "zeroshot")
    assert {r["method"] for r in recs} == {"lp", "mlp", "nmtune", "zeroshot"}
    assert {r["regime"] for r in recs} == {"contrastive"} and {r["pretrain_seed"] for r in recs} == {0}
    assert {r["kind"] for r in recs} == {"id", "ood"} and {r["gamma"] for r in recs} == {0.0, 0.3}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in recs)
    curves = res["pretrain"]
    assert curves["g30_s0"]["num_swapped"] == round(0.3 * curves["g30_s0"]["num_pairs"])
    assert curves["g00_s0"]["num_swapped"] == 0
    assert all(len(c["loss"]) == len(c["zeroshot_val"]) == 2 for c in curves.values())
    assert set(res["backbone"]) == {0.0, 0.3}
    assert all("id_sve" in b and "ood_lsvr" in b for b in res["backbone"].values())
    for f in res["figures"]:
        assert pathlib.Path(f).read_bytes()[:4] == b"\x89PNG"
    assert {pathlib.Path(f).name for f in res["figures"]} >= {"pretrain_curves.png", "noise_vs_accuracy.png",
                                                              "sve_lsvr.png", "methods.png"}
    assert "zeroshot" in (tmp_path / "results.md").read_text()
    stamp = (tmp_path / "pretrain" / "g30_s0" / "model.pt").stat().st_mtime_ns
    again = contrastive.run_regime(tmp_path, tiny=True, gammas=(0.0, 0.3), pretrain_seeds=(0,), settings=settings)
    assert (tmp_path / "pretrain" / "g30_s0" / "model.pt").stat().st_mtime_ns == stamp  # not retrained
    assert again["records"] == recs


def _pretrain_cmd(out: pathlib.Path) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "pretrain_clip.py"), "--tiny", "--epochs", "8",
            "--batch-size", "16", "--gamma", "0.3", "--out", str(out)]


@pytest.mark.slow
def test_sigkill_mid_pretraining_then_rerun_gives_identical_weights(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_pretrain_cmd(ref), check=True, env=_env(), capture_output=True, timeout=600)
    proc = subprocess.Popen(_pretrain_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = run / "checkpoint.pt", time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists() and not (run / "model.pt").exists(), "the kill must land mid pre-training"
    epochs_before = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= epochs_before < 8
    subprocess.run(_pretrain_cmd(run), check=True, env=_env(), capture_output=True, timeout=600)
    a = torch.load(ref / "model.pt", weights_only=False)["model"]
    b = torch.load(run / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((ref / "metrics.json").read_text())["history"]
    hb = json.loads((run / "metrics.json").read_text())["history"]
    assert ha == hb


class _Interrupted(Exception):
    pass


def _interrupt(rank: int) -> None:
    raise _Interrupted(rank)


@pytest.mark.slow
def test_clip_pretraining_resumes_mid_epoch_from_a_step_checkpoint(tmp_path, monkeypatch):
    pairs, val = cd.offline_pairs(tiny=True), cd.offline_val(tiny=True)
    cfg = pc.ClipPretrainConfig(gamma=0.3, epochs=2, batch_size=16)
    per_epoch = len(pairs.captions) // 16
    every = per_epoch + 2  # the first step checkpoint lands in epoch 2, at step 2
    full = pc.pretrain_clip(pairs, val, tmp_path / "full", cfg)
    with monkeypatch.context() as m:  # stop right after the first step checkpoint, as a kill would
        m.setattr(tl, "_after_step_checkpoint", _interrupt)
        with pytest.raises(_Interrupted):
            pc.pretrain_clip(pairs, val, tmp_path / "cut", cfg, checkpoint_every_steps=every)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], len(state["history"])) == (1, 2, 1)
    torch.manual_seed(321)  # the resumed run must not depend on the process's RNG state
    resumed = pc.pretrain_clip(pairs, val, tmp_path / "cut", cfg)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"]


@pytest.mark.slow
def test_open_clip_train_on_noisy_shards_then_evaluate_the_checkpoint(tmp_path):
    shards = write_shards(tmp_path / "raw", n_shards=2, per_shard=24, jpeg=True)
    ns.noisy_shards(shards, tmp_path / "noisy", 0.25, seed=0, buffer=24)
    model_dir = pc.write_model_dir(tmp_path / "model")
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model_dir}",
           "--train-data", str(tmp_path / "noisy" / "{000..001}.tar"), "--dataset-type", "webdataset",
           "--train-num-samples", "48", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "2",
           "--precision", "fp32", "--workers", "0", "--device", "cpu", "--save-frequency", "1",
           "--zeroshot-frequency", "0", "--logs", str(tmp_path / "logs"), "--name", "g25", "--seed", "0",
           "--log-every-n-steps", "1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "g25" / "out.log").read_text()
    assert "Contrastive_loss" in log and "[48/48 (100%)]" in log  # six steps over the 48 noisy pairs
    ckpt = tmp_path / "logs" / "g25" / "checkpoints" / "epoch_1.pt"
    model = pc.load_open_clip_checkpoint(ckpt, f"local-dir:{model_dir}")
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(model.state_dict()["logit_scale"], trained["logit_scale"])
    tasks = [t for t in contrastive.vd.offline_tasks(tiny=True) if t.name in ("digits", "rotated-digits")]
    res = contrastive.evaluate_checkpoint(ckpt, f"local-dir:{model_dir}", tmp_path / "eval", gamma=0.25, tasks=tasks,
                                          settings=ev.TuneSettings(methods=("lp",), seeds=(0,), epochs=1))
    assert {r["method"] for r in res["records"]} == {"lp", "zeroshot"}
    assert {r["task"] for r in res["records"]} == {"digits", "rotated-digits"}
    assert all(r["gamma"] == 0.25 and r["regime"] == "contrastive" for r in res["records"])
