"""The vision study examples at a tiny size: resume, real-data loaders, the whole pipeline."""

from __future__ import annotations

import json
import os
import math
import pathlib
import pickle
import sys

import numpy as np
import pytest
import torch

from nmtune_study import evaluate as ev
from nmtune_study import pretrain as pt
from nmtune_study import reproduce as rp
from nmtune_study import train_loop as tl
from nmtune_study.data import vision as vd

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"  # the entry points run as users run them

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def tiny_data():
    return vd.offline_pretrain_data(tiny=True)


def test_pretrain_resume_is_bit_identical(tmp_path, tiny_data):
    cfg = pt.PretrainConfig(noise=0.2, epochs=2, batch_size=16)
    full = pt.pretrain(tiny_data, tmp_path / "full", cfg, progress=False)
    part = pt.pretrain(tiny_data, tmp_path / "cut", cfg, progress=False, stop_after=1)
    assert part["epochs_done"] == 1 and not part["finished"]
    assert not (tmp_path / "cut" / "model.pt").exists()
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    resumed = pt.pretrain(tiny_data, tmp_path / "cut", cfg, progress=False)
    assert resumed["finished"] and full["finished"]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    noisy = torch.load(tmp_path / "full" / "noisy_labels.pt", weights_only=False)
    assert int(noisy["mask"].sum()) == round(0.2 * len(tiny_data.labels)) == full["num_noisy"]
    with pytest.raises(ValueError, match="config"):
        pt.pretrain(tiny_data, tmp_path / "cut", pt.PretrainConfig(noise=0.3, epochs=2, batch_size=16),
                    progress=False)


def _run_until_then_sigkill(cmd: list[str], marker: pathlib.Path, env: dict[str, str], timeout: float = 300) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``marker`` exists (it must appear while the command runs)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"{cmd[1]} exited before writing {marker.name}"
        assert time.monotonic() < deadline, f"no {marker.name} within {timeout:.0f} s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_pretrain_killed_process_resumes_to_identical_weights(tmp_path):
    """SIGKILL a real pretrain.py process once its first checkpoint exists, rerun it, and
    compare with an uninterrupted run: weights and loss history must be identical."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(EXAMPLES / "pretrain.py"), "--tiny", "--epochs", "6", "--batch-size", "8",
           "--noise", "0.2"]
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert full.returncode == 0, full.stderr[-2000:]

    cut = tmp_path / "cut"
    _run_until_then_sigkill([*cmd, "--out", str(cut)], cut / "checkpoint.pt", env)
    assert not (cut / "model.pt").exists(), "the run finished before it was killed"
    done = torch.load(cut / "checkpoint.pt", weights_only=False)["epoch"]
    assert 1 <= done < 6

    resumed = subprocess.run([*cmd, "--out", str(cut)], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["model"]
    b = torch.load(cut / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    hb = json.loads((cut / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


@pytest.mark.distributed
def test_pretrain_ddp_two_gloo_ranks(tmp_path):
    """The DDP path of pretrain.py under torchrun (2 CPU ranks, gloo), tiny size."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "pretrain.py"), "--tiny", "--epochs", "1", "--batch-size", "8", "--noise", "0.1",
           "--out", str(tmp_path / "ddp")]
    import signal

    # A new session, so that a timeout kills torchrun *and* its ranks, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["finished"] and metrics["num_noisy"] == 12
    state = torch.load(tmp_path / "ddp" / "model.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class _Interrupted(Exception):
    pass


def _interrupt(rank: int) -> None:
    raise _Interrupted(rank)


@pytest.mark.parametrize("loader", ["in-memory batches", "DataLoader"])
def test_pretrain_resumes_mid_epoch_from_a_step_checkpoint(tmp_path, tiny_data, monkeypatch, loader):
    data = tiny_data
    if loader == "DataLoader":  # a dataset that is not an in-memory tensor source takes the DataLoader path
        data = vd.PretrainData(torch.utils.data.Subset(data.train, range(len(data.train))), data.val, data.labels,
                               data.num_classes, data.in_chans, data.image_size)
    cfg = pt.PretrainConfig(noise=0.2, epochs=2, batch_size=16)  # 192 samples: 12 steps an epoch
    full = pt.pretrain(data, tmp_path / "full", cfg, progress=False)
    with monkeypatch.context() as m:  # stop right after the first step checkpoint, as a kill would
        m.setattr(tl, "_after_step_checkpoint", _interrupt)
        with pytest.raises(_Interrupted):
            pt.pretrain(data, tmp_path / "cut", cfg, progress=False, checkpoint_every_steps=5)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], state["partial"]["seen"]) == (0, 5, 80)
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    resumed = pt.pretrain(data, tmp_path / "cut", cfg, progress=False, checkpoint_every_steps=5)
    assert resumed["finished"]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    with pytest.raises(ValueError, match="checkpoint_every_steps must be an int >= 1 or None; got 0"):
        pt.pretrain(data, tmp_path / "bad", cfg, progress=False, checkpoint_every_steps=0)


def _descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (from /proc): torchrun starts each worker in a session of its
    own, so killing torchrun's process group would leave the ranks running."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _torchrun(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    import os
    import signal
    import subprocess
    import tempfile

    # Output to a file, not a pipe, so that a rank left behind cannot keep the test waiting on the pipe;
    # on a timeout, torchrun and every rank it started are killed before the test fails.
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=log,
                                stderr=subprocess.STDOUT, text=True, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            log.seek(0)
            pytest.fail(f"torchrun did not finish in {timeout:.0f} s; its output ends with:\n{log.read()[-3000:]}")
        log.seek(0)
        return proc.returncode, log.read()


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_torchrun_restarts_a_sigkilled_rank_from_the_step_checkpoint(tmp_path):
    """2 gloo ranks: rank 1 is SIGKILLed right after the first step checkpoint (epoch 1 of 2, step 3
    of 7); torchrun restarts the group once, which resumes mid-epoch from that checkpoint and ends
    with the weights of an uninterrupted run, bit for bit. Exactly one worker failure is allowed: the
    restarted group must not trip over the failed group's keys in torchrun's shared store
    (``nmtune_study.train_loop.init_distributed``), nor abort at exit."""
    import os

    # a rank that cannot reach its peer fails after 60 s (not torch's 30 minutes) instead of hanging the test
    env = dict(os.environ, OMP_NUM_THREADS="1", NMTUNE_DIST_TIMEOUT="60")
    script = [str(EXAMPLES / "pretrain.py"), "--tiny", "--epochs", "2", "--batch-size", "8", "--noise", "0.1"]
    rc, out = _torchrun(["--standalone", "--nproc_per_node", "2", *script, "--out", str(tmp_path / "ref")], env)
    assert rc == 0, out[-3000:]
    assert "failed (exitcode" not in out, out[-3000:]
    rc, out = _torchrun(["--standalone", "--nproc_per_node", "2", "--max-restarts", "1", *script,
                         "--checkpoint-every-steps", "3", "--out", str(tmp_path / "run")],
                        {**env, "NMTUNE_SIGKILL_AFTER_STEP_CHECKPOINT": "1"}, timeout=300)
    assert rc == 0, out[-3000:]
    assert out.count("failed (exitcode") == 1 and "failed (exitcode: -9)" in out, out[-3000:]  # the SIGKILL, only
    assert "continuing from epoch 1, step 3" in out, out[-3000:]  # ...and the new group resumed mid-epoch
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "ref" / "metrics.json").read_text())["history"]
    hb = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_pretrain_config_validation():
    with pytest.raises(ValueError, match="noise"):
        pt.PretrainConfig(noise=1.5)
    with pytest.raises(ValueError, match="amp"):
        pt.PretrainConfig(amp="fp8")


# ----------------------------------------------------------------------------- real-data loaders


def _png(path: pathlib.Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def _folder_tree(root: pathlib.Path, splits, classes, per=2):
    for s in splits:
        for i, c in enumerate(classes):
            for j in range(per):
                _png(root / s / c / f"{j}.png", 10 * i + j)


def _cifar(root: pathlib.Path, name: str, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    for f in files:
        entry = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(range(n))}
        with open(folder / f, "wb") as fh:
            pickle.dump(entry, fh)


def test_real_loaders_on_tiny_files(tmp_path):
    for name in ("cifar10", "cifar100"):
        _cifar(tmp_path / name, name)
        task = vd.parse_task_spec(f"{name}:{tmp_path / name}", image_size=16)
        x, y = task.train[3]
        assert tuple(x.shape) == (3, 16, 16) and y == 3
        assert len(task.train) == (30 if name == "cifar10" else 6) and len(task.tests["test"]) == 6
        assert task.num_classes == (10 if name == "cifar10" else 100)
    with pytest.raises(FileNotFoundError, match="download"):
        vd.cifar_dataset(tmp_path / "missing", "cifar10", train=True)

    _folder_tree(tmp_path / "ds", ["train", "val"], ["cat", "dog"])
    t = vd.parse_task_spec(f"folder:{tmp_path / 'ds'}", image_size=16)
    assert t.kind == "id" and t.num_classes == 2 and len(t.tests["test"]) == 4

    dn = tmp_path / "domainnet"
    for i, dom in enumerate(["clipart", "real", "sketch"]):
        _folder_tree(dn, [dom], ["apple", "bee"] if dom != "sketch" else ["bee"], per=1)
    t = vd.parse_task_spec(f"domains:{dn}:real", image_size=16)
    assert t.kind == "ood" and sorted(t.tests) == ["clipart", "sketch"]
    assert [y for _, y in t.tests["sketch"].samples] == [1]  # 'bee' keeps the shared label

    _folder_tree(tmp_path / "in1k", ["train"], ["n01", "n02", "n03"], per=1)
    _folder_tree(tmp_path / "inr", ["."], ["n03"], per=1)
    t = vd.parse_task_spec(f"variants:{tmp_path / 'in1k' / 'train'}:{tmp_path / 'inr'}", image_size=16)
    assert t.tests["inr"].targets == [2]
    with pytest.raises(ValueError, match="unknown task kind"):
        vd.parse_task_spec("nope:/x")


def test_pretrain_and_evaluate_on_imagefolder(tmp_path):
    """Paper-scale code path (real loaders, 3-channel timm model) on tiny files."""
    _folder_tree(tmp_path / "pre", ["train", "val"], ["a", "b", "c"], per=3)
    _folder_tree(tmp_path / "down", ["train", "test"], ["x", "y"], per=3)
    dn = tmp_path / "dom"
    for dom in ("real", "sketch"):
        _folder_tree(dn, [dom], ["p", "q"], per=2)
    m = pt.run(["--dataset", "imagefolder", "--data-root", str(tmp_path / "pre"), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--noise", "0.2", "--out", str(tmp_path / "run")])
    assert m["finished"] and 0.0 <= m["val_accuracy"] <= 1.0
    res = ev.run(["--backbone", str(tmp_path / "run" / "model.pt"), "--out", str(tmp_path / "ev"),
                   "--task", f"folder:{tmp_path / 'down'}", "--task", f"domains:{dn}:real", "--image-size", "32",
                   "--seeds", "0", "--epochs", "2", "--fractions", "0.5", "1.0", "--tune-batch-size", "4"])
    assert res["settings"]["gamma"] == pytest.approx(0.2)
    kinds = {(r["task"], r["kind"], r["domain"]) for r in res["records"]}
    assert kinds == {("down", "id", "test"), ("dom", "ood", "sketch")}
    assert len(res["records"]) == 2 * 3 * 2  # tasks x methods x fractions
    assert all(math.isfinite(r[k]) for r in res["records"] for k in ("accuracy", "macro_f1", "sve", "lsvr"))


def test_lora_rows(tmp_path, tiny_data):
    pytest.importorskip("peft", reason="the [lora] extra is part of the test environment")
    pt.pretrain(tiny_data, tmp_path / "m", pt.PretrainConfig(epochs=1, batch_size=16), progress=False)
    task = vd.offline_tasks(tiny=True)[0]
    recs = ev._lora_records(str(tmp_path / "m" / "model.pt"), [task], 0.0, epochs=1, seeds=[0])
    assert {r["method"] for r in recs} == {"lora", "lora+nmtune"}
    assert all(math.isfinite(r[k]) for r in recs for k in ("accuracy", "macro_f1", "sve", "lsvr"))


# ----------------------------------------------------------------------------- the whole pipeline


def test_reproduce_paper_tiny(tmp_path, monkeypatch):
    out = tmp_path / "study"

    def fake_language(lang_out, tiny):  # the language helper's contract: run_study(out, tiny=...)
        lang_out.mkdir(parents=True)
        (lang_out / "table.md").write_text("# title\n\n| method | ID |\n|---|---|\n| LANGTABLE | 1 |\n")
        (lang_out / "results.json").write_text("{}")
        return {}

    monkeypatch.setattr(rp.language_study, "run_study", fake_language)
    monkeypatch.setattr(rp, "committed_results", lambda: tmp_path / "committed")
    res = rp.run(["--tiny", "--out", str(out), "--no-progress", "--language", "--refresh-results",
                   "--ablations", "top_k", "label_noise"])
    report = (out / "report.md").read_text()
    for section in ("## Supervised regime", "### Claims", "Table 1 analogue", "Figure 2", "Figure 3", "Figure 5",
                    "LANGTABLE", "### Ablations", "top_k of L_SVD", "noisy downstream labels", "hierarchical"):
        assert section in report, section
    for rel in res["figures"].values():
        data = (out / rel).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == 16
    for c in claims:
        assert {"claim", "verdict", "estimate", "ci_low", "ci_high", "n_pretrain", "n_tune"} <= set(c)
        assert c["verdict"] in ("reproduced", "contradicted", "inconclusive") and c["n_pretrain"] == 2
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"]
    saved = json.loads((out / "results.json").read_text())
    assert {(r["gamma"], r["pretrain_seed"]) for r in saved["records"]} == {
        (g, p) for g in (0.0, 0.05, 0.1, 0.2, 0.3) for p in (0, 1)}
    assert {r["method"] for r in saved["records"]} == {"lp", "mlp", "nmtune"}
    assert all(r["regime"] == "supervised" for r in saved["records"])
    assert all(math.isfinite(r[k]) for r in saved["records"] for k in ("accuracy", "macro_f1", "sve", "lsvr"))
    assert {r["variant"] for r in saved["ablation_records"] if r["ablation"] == "label_noise"} == {
        "eta=0%", "eta=10%", "eta=30%"}
    assert all(r["kind"] == "id" for r in saved["ablation_records"] if r["ablation"] == "label_noise")
    committed = tmp_path / "committed"
    assert (committed / "claims.json").read_text() == (out / "claims.json").read_text()
    assert (committed / "figures" / "supervised_forest.png").exists()
    # a rerun skips every finished stage (two pre-training seeds per noise ratio) and gives the same records
    models = sorted(out.glob("pretrain/*/s*/model.pt"))
    assert len(models) == 10
    mtimes = {p: p.stat().st_mtime for p in models}
    again = rp.run(["--tiny", "--out", str(out), "--no-progress", "--ablations", "top_k", "label_noise"])
    assert {p: p.stat().st_mtime for p in models} == mtimes
    assert again["records"] == saved["records"] and again["claims"] == saved["claims"]


def test_reproduce_paper_killed_mid_study_resumes_to_the_same_results(tmp_path):
    """SIGKILL the study command (as users run it) in the middle of its (noise, seed) cells, run the
    same command again: finished cells are not redone, and records and claims equal an
    uninterrupted run's."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(EXAMPLES / "reproduce_paper.py"), "--tiny", "--no-progress", "--jobs", "1"]
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=600, env=env)
    assert full.returncode == 0, full.stderr[-2000:]

    cut = tmp_path / "cut"
    _run_until_then_sigkill([*cmd, "--out", str(cut)], cut / "pretrain" / "g10" / "s0" / "model.pt", env)  # mid-cells
    assert not (cut / "results.json").exists(), "the study finished before it was killed"
    finished = sorted(cut.glob("pretrain/*/s*/model.pt"))
    mtimes = {p: p.stat().st_mtime_ns for p in finished}

    resumed = subprocess.run([*cmd, "--out", str(cut)], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes, "a finished cell was pre-trained again"
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    assert a["records"] and a["records"] == b["records"]
    assert a["pretrain_memorised"] == b["pretrain_memorised"]
    assert (tmp_path / "full" / "claims.json").read_text() == (cut / "claims.json").read_text()


def _fake_contrastive(calls):
    import types

    def run_regime(out_dir, *, tiny=False, gammas=(0.0, 0.05, 0.10, 0.20, 0.30), pretrain_seeds=(0, 1, 2),
                   tune_seeds=(0, 1, 2), settings=None, clip=None, jobs=1, threads=1):
        calls.append(dict(out_dir=out_dir, tiny=tiny, gammas=gammas, pretrain_seeds=pretrain_seeds,
                          tune_seeds=tune_seeds, settings=settings))
        recs = []
        for g in gammas:
            for p in pretrain_seeds:
                for m, base in (("lp", 0.6), ("mlp", 0.6), ("nmtune", 0.7), ("zeroshot", 0.3)):
                    for t in (tune_seeds if m != "zeroshot" else tune_seeds[:1]):
                        for kind in ("id", "ood"):
                            acc = base - g / 2 + 0.01 * p + 0.001 * t
                            recs.append(dict(regime="contrastive", gamma=g, pretrain_seed=p, method=m, kind=kind,
                                             task="glyphs", domain="test", seed=t, fraction=1.0, accuracy=acc,
                                             macro_f1=acc, sve=2.0 + g, lsvr=1.0 + g))
        fig = out_dir / "figures" / "clip_curves.png"
        fig.parent.mkdir(parents=True, exist_ok=True)
        fig.write_bytes(b"\x89PNG fake")
        return {"records": recs,
                "pretrain": {g: {p: {"loss": [2.0, 1.0], "zeroshot_val_accuracy": [0.2, 0.5 - g]}
                                 for p in pretrain_seeds} for g in gammas},
                "backbone": {g: {p: {"id_sve": 3.0 + g + 0.01 * p, "ood_lsvr": 1.0 + g} for p in pretrain_seeds}
                             for g in gammas},
                "figures": [fig]}

    return types.SimpleNamespace(run_regime=run_regime)


def test_reproduce_paper_contrastive_regime_wiring(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rp, "contrastive", _fake_contrastive(calls))
    out = tmp_path / "study"
    res = rp.run(["--regime", "contrastive", "--out", str(out), "--no-progress", "--seeds", "3,4",
                   "--pretrain-seeds", "5", "6", "7"])
    (call,) = calls
    assert call["out_dir"] == out / "contrastive" and call["pretrain_seeds"] == (5, 6, 7)
    assert call["tune_seeds"] == (3, 4) and call["gammas"] == (0.0, 0.05, 0.1, 0.2, 0.3)
    assert isinstance(call["settings"], ev.TuneSettings) and call["settings"].seeds == (3, 4)
    report = (out / "report.md").read_text()
    assert "## Contrastive regime" in report and "## Supervised regime" not in report
    assert "contrastive/figures/clip_curves.png" in report
    claims = {c["claim"]: c for c in json.loads((out / "claims.json").read_text())}
    assert all(c["regime"] == "contrastive" for c in claims.values())
    zs = [c for k, c in claims.items() if "zero-shot" in k]
    assert len(zs) == 2 and all(c["verdict"] == "reproduced" and c["n_pretrain"] == 3 for c in zs)
    pre = next(c for k, c in claims.items() if k.startswith("Pre-training accuracy"))
    assert pre["verdict"] == "reproduced" and pre["estimate"] == pytest.approx(-1.0)
    sve = next(c for k, c in claims.items() if k.startswith("SVE of the pre-trained"))
    assert sve["estimate"] == pytest.approx(1.0)
    assert res["counts"]["contrastive"]["reproduced"] >= 4


def test_reproduce_paper_regime_all_has_a_section_per_regime(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rp, "contrastive", _fake_contrastive(calls))
    out = tmp_path / "study"
    rp.run(["--regime", "all", "--tiny", "--out", str(out), "--no-progress", "--gammas", "0", "0.1",
             "--ablations"])
    report = (out / "report.md").read_text()
    assert report.index("## Supervised regime") < report.index("## Contrastive regime")
    assert calls[0]["tiny"] and calls[0]["gammas"] == (0.0, 0.1)
    regimes = {c["regime"] for c in json.loads((out / "claims.json").read_text())}
    assert regimes == {"supervised", "contrastive"}


def test_reproduce_paper_parses_seed_lists_and_regimes():
    a = rp.parser().parse_args(["--seeds", "3,4,5", "--pretrain-seeds", "3", "4,5"])
    s = rp._settings(a)
    assert s["seeds"] == [3, 4, 5] and s["pretrain_seeds"] == [3, 4, 5]
    d = rp._settings(rp.parser().parse_args([]))
    assert len(d["pretrain_seeds"]) >= 3 and d["ablations"] == list(rp.PROFILES["default"]["ablations"])
    assert rp._settings(rp.parser().parse_args(["--full"]))["ablations"] == list(rp.ABLATIONS)
    assert rp.parser().parse_args([]).regime == "supervised" and rp.parser().parse_args([]).out is None
    assert rp.parser().parse_args([]).profile == "default"
    with pytest.raises(SystemExit):
        rp.parser().parse_args(["--regime", "clip"])


def test_tune_settings_validate_and_record() -> None:
    settings = ev.TuneSettings(methods=["lp", "nmtune"], seeds=[1], loss_config="official", batch_size=64)
    assert settings.methods == ("lp", "nmtune") and settings.seeds == (1,)
    assert settings.as_record() == dict(methods=["lp", "nmtune"], seeds=[1], fractions=[1.0], epochs=30,
                                        loss_config="official", tune_batch_size=64, label_noise=0.0,
                                        normalize_rows=True, protocols=["paper"], val_fraction=0.2,
                                        lr_factors=list(ev.LR_FACTORS))
    with pytest.raises(ValueError, match="label_noise"):
        ev.TuneSettings(label_noise=1.0)
    with pytest.raises(ValueError, match=r"methods must be a non-empty subset of \('lp', 'mlp', 'nmtune'\)"):
        ev.TuneSettings(methods=["lora"])


def test_asymmetric_pretrain_noise_stays_within_its_classes(tmp_path, tiny_data):
    cfg = pt.PretrainConfig(noise=0.5, epochs=1, batch_size=16, noise_type="asymmetric", noise_classes=(0, 1, 2))
    pt.pretrain(tiny_data, tmp_path, cfg, progress=False)
    noisy = torch.load(tmp_path / "noisy_labels.pt", weights_only=False)
    flipped = noisy["mask"]
    assert int(flipped.sum()) == round(0.5 * int(torch.isin(tiny_data.labels, torch.tensor([0, 1, 2])).sum()))
    assert set(tiny_data.labels[flipped].tolist()) <= {0, 1, 2} and set(noisy["labels"][flipped].tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="noise_classes"):
        pt.PretrainConfig(noise_type="asymmetric", noise_classes=(1,))
    with pytest.raises(ValueError, match="noise_type"):
        pt.PretrainConfig(noise_type="pair")


def test_downstream_label_noise_only_touches_id_training_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.randn(90, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 8).float()
    base = dict(num_classes=3, train=(x, y), tests={"test": (x, y)})
    clean = ev.TuneSettings(methods=("lp",), seeds=(0,), epochs=2, batch_size=16)
    noisy = ev.TuneSettings(methods=("lp",), seeds=(0,), epochs=2, batch_size=16, label_noise=0.6)
    acc = {}
    for kind in ("id", "ood"):
        feats = dict(base, name=kind, kind=kind)
        acc[kind] = [ev.tune_and_score(feats, gamma=0.0, settings=s, pretrain_seed=4)[0] for s in (clean, noisy)]
    assert acc["ood"][0]["accuracy"] == acc["ood"][1]["accuracy"]
    assert acc["id"][0]["accuracy"] != acc["id"][1]["accuracy"]
    assert acc["id"][0]["pretrain_seed"] == 4 and acc["id"][0]["regime"] == "supervised"


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_restart_soak_tool_reports_one_worker_failure_per_run(tmp_path):
    """tools/restart_soak.sh (the documented way to repeat the restart above) runs and reports one
    line per run: exit code 0 and exactly one worker failure, the SIGKILL."""
    import subprocess

    tool = EXAMPLES.parent / "tools" / "restart_soak.sh"
    out = subprocess.run(["bash", str(tool), "1", str(tmp_path)], capture_output=True, text=True, timeout=280,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("run 1 rc=0 ") and out.stdout.strip().endswith("worker_failures=1"), (
        out.stdout + (tmp_path / "run1" / "log").read_text()[-2000:])
