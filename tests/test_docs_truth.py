"""The docs say what the result files and the code say.

* Every figure the docs quote from a run sits in a block that ``tools/sync_docs.py``
  renders from its result file; ``--check`` fails when a block and its result file
  disagree (shown here on a tampered copy), and a new run that adds keys renders the same.
* Figures that cannot be generated (the ratios quoted in prose, the numerical cut-offs,
  the class count of the contrastive data, the scale of ``L_COV``) are checked against
  their source here.
* Claims about the code (one Gram product, no ``D x D`` matrix when ``M < D``, which
  paths read tensor values on the host) are counted on the code itself, so each test
  fails when its claim stops being true.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nmtune import NMTuneLoss, NMTuneRegularizer
from nmtune.functional import covariance_loss, singular_values
from nmtune.testing import HostSyncCounter

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "sync_docs.py"
aten = torch.ops.aten


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sync_docs = _load("sync_docs", TOOL)


def _copy_checkout(tmp_path: Path) -> Path:
    """The docs and the result files they are rendered from, in a scratch checkout."""
    root = tmp_path / "checkout"
    for rel in ("README.md", "examples/README.md", "benchmarks/README.md", "benchmarks/RESULTS.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copytree(ROOT / "examples" / "results", root / "examples" / "results",
                    ignore=shutil.ignore_patterns("*.png"))
    return root


# ----------------------------------------------------------------------------------------------
# generated blocks


def test_checkout_blocks_match_their_result_files() -> None:
    assert sync_docs.sync(ROOT, check=True) == []
    run = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_every_block_has_a_renderer_and_every_renderer_a_block() -> None:
    used: set[str] = set()
    for path in sync_docs.doc_files(ROOT):
        names = [name for name, _ in sync_docs.blocks(path.read_text())]
        assert set(names) <= set(sync_docs.RENDERERS), f"{path}: {set(names) - set(sync_docs.RENDERERS)}"
        used.update(names)
    assert used == set(sync_docs.RENDERERS), f"renderers with no block: {set(sync_docs.RENDERERS) - used}"


def test_unpaired_marker_is_an_error() -> None:
    with pytest.raises(ValueError, match="unpaired"):
        sync_docs.blocks("text <!-- generated:study-runtime --> 13 min")


def test_an_inline_block_may_not_start_a_line() -> None:
    """CommonMark would render such a line as raw HTML, code spans and emphasis included."""
    with pytest.raises(ValueError, match="starts a line"):
        sync_docs.blocks("text\n  <!-- generated:study-runtime -->`13` min<!-- /generated:study-runtime -->")
    assert sync_docs.blocks("took <!-- generated:a -->`13` min<!-- /generated:a -->") == [("a", "`13` min")]
    assert sync_docs.blocks("<!-- generated:a -->\n| t |\n<!-- /generated:a -->") == [("a", "\n| t |\n")]


def test_a_tampered_figure_fails_the_check_naming_its_block(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _copy_checkout(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    (name, body), = [(n, b) for n, b in sync_docs.blocks(text) if n == "supervised-verdicts"]
    figure = re.search(r"[−+]\d+\.\d\d", body).group(0)  # the first estimate the block quotes
    readme.write_text(text.replace(body, body.replace(figure, figure[0] + "9" + figure[1:], 1)))
    assert sync_docs.main(["--check", "--root", str(root)]) == 1
    assert "README.md: supervised-verdicts" in capsys.readouterr().err
    assert sync_docs.main(["--root", str(root)]) == 0  # regenerating repairs it
    assert sync_docs.main(["--check", "--root", str(root)]) == 0
    assert readme.read_text() == text


def test_a_changed_result_file_fails_the_check_until_synced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _copy_checkout(tmp_path)
    claims_path = root / "examples" / "results" / "claims.json"
    claims = json.loads(claims_path.read_text())
    claims[0]["estimate"] += 1.0  # a new run of the study
    claims_path.write_text(json.dumps(claims))
    bench = root / "benchmarks" / "RESULTS.md"
    bench.write_text(bench.read_text().replace("| float32 | 256 | 768 | 55.2 | 8.57 | 14.9 | 2.69 | 0.155 | 0.271 |",
                                               "| float32 | 256 | 768 | 55.2 | 8.57 | 14.9 | 2.69 | 0.155 | 0.333 |"))
    assert sync_docs.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "README.md: supervised-verdicts" in err and "README.md: perf-table" in err
    assert "README.md: contrastive-verdicts" not in err
    sync_docs.main(["--root", str(root)])
    assert "| (256, 768) | 0.33× |" in (root / "README.md").read_text()
    assert sync_docs.main(["--check", "--root", str(root)]) == 0


def test_a_new_run_with_added_keys_renders_the_same(tmp_path: Path) -> None:
    """Result files that gain keys (a later run's new measurements) change no block."""
    root = _copy_checkout(tmp_path)
    before = sync_docs.render_all(root)
    results = root / "examples" / "results"

    def extend(rel: str, edit: Any) -> None:
        data = json.loads((results / rel).read_text())
        edit(data)
        (results / rel).write_text(json.dumps(data))

    extend("claims.json", lambda cs: [c.update(future_measure={"0.3": 0.12}) for c in cs])
    extend("results.json", lambda d: d.update(future_measure={"supervised": {"0.3": 0.12}}))
    extend("contrastive/records.json", lambda d: (d.update(future_measure={}),
                                                  [p.update(future_measure=0.1) for p in d["pretrain"].values()]))
    extend("language/results.json", lambda d: d["meta"].update(extra_seconds=1.0))
    assert sync_docs.render_all(root) == before


def test_seed_stability_of_another_run_is_not_quoted(tmp_path: Path) -> None:
    """When claims.json is replaced, the old seed-stability comparison is reported stale, not quoted."""
    root = _copy_checkout(tmp_path)
    path = root / "examples" / "results" / "claims.json"
    claims = json.loads(path.read_text())
    first = next(c for c in claims if c["regime"] == "supervised" and c["verdict"] == "inconclusive")
    first["verdict"] = "reproduced"
    path.write_text(json.dumps(claims))
    assert "no longer matches" in sync_docs.render_all(root)["seed-stability"]


def test_number_formats() -> None:
    assert [sync_docs.ratio(x) for x in ("0.155", "0.0716", "9.67e-03", "1.69", "0.498")] == \
        ["0.16×", "0.072×", "0.0097×", "1.69×", "0.50×"]
    assert sync_docs.num(-0.004, 2, sign=True) == "+0.00" and sync_docs.num(-1.5, 1) == "−1.5"
    assert sync_docs.sci(4.94e-9) == "5e-9"


# ----------------------------------------------------------------------------------------------
# figures quoted in prose, checked against their source


def _outside_blocks(text: str) -> str:
    return sync_docs.BLOCK.sub("", text)


def test_ratios_quoted_in_readme_prose_are_in_the_benchmark_results() -> None:
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    prose = _outside_blocks((ROOT / "README.md").read_text())
    quoted = set()
    for match in re.finditer(r"(\d+(?:\.\d+)?)(?:\s*[–-]\s*(\d+(?:\.\d+)?))?×", prose):
        quoted.update(g for g in match.groups() if g)
    assert {"1.08", "1.24", "1.57", "1.63"} <= quoted
    missing = [q for q in sorted(quoted) if not re.search(rf"(?<![\d.]){re.escape(q)}(?![\d])", results)]
    assert not missing, f"README quotes ratios that benchmarks/RESULTS.md does not hold: {missing}"


def test_full_finetuning_ratios_are_the_recorded_ones() -> None:
    """docs/full_finetuning.md's CPU-time ratios and the copy's memory are those RESULTS.md records."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    text = (ROOT / "docs" / "full_finetuning.md").read_text()
    rows = {r["`F` from"]: r for r in sync_docs.table_with(text, "`F` from", "/ fine-tuning, CPU")}
    recorded = re.search(r"F from a frozen copy ([\d.]+)× \(\+([\d.]+) MB\), from the warm cache ([\d.]+)×, "
                         r"from the same\s+weights under `no_grad` ([\d.]+)×", results)
    assert recorded is not None
    copy, megabytes, cache, same = recorded.groups()
    assert rows["frozen copy"]["/ fine-tuning, CPU"] == copy and megabytes in rows["frozen copy"]["extra memory"]
    assert rows["cache (warm)"]["/ fine-tuning, CPU"] == cache
    assert rows["same weights, `no_grad`"]["/ fine-tuning, CPU"] == same


def test_language_sizes_and_standard_errors_are_the_recorded_ones() -> None:
    """docs/language.md's task sizes and binomial standard errors, from the language results.json."""
    task = json.loads((ROOT / "examples" / "results" / "language" / "results.json").read_text())["tasks"]["wordnet"]
    text = (ROOT / "docs" / "language.md").read_text()
    n_ood = sum(task["ood_sets"].values())
    assert f"That gives {task['n_train']:,} training texts, {task['n_id_test']:,} ID-test and {n_ood:,} OOD-test texts" \
        in text
    assert f"{task['num_classes']} noun and verb categories qualify" in text
    lp = task["methods"]["lp"]

    def se(acc: float, n: int) -> float:
        return 100 * math.sqrt(acc / 100 * (1 - acc / 100) / n)

    quoted = f"about ±{se(lp['id_acc']['mean'], task['n_id_test']):.1f} points ID and " \
             f"±{se(lp['ood_acc']['mean'], n_ood):.1f} OOD"
    assert quoted in text, quoted


def test_script_tables_name_every_script() -> None:
    examples = (ROOT / "examples" / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "examples").glob("*.py")) if f"| `{p.name}` |" not in examples]
    assert not missing, f"examples/README.md's script table lacks {missing}"
    modules = [p.relative_to(ROOT / "nmtune_study").as_posix() for p in sorted((ROOT / "nmtune_study").rglob("*.py"))
               if p.name != "__init__.py"]
    missing = [m for m in modules if f"| `{m}` |" not in examples]
    assert not missing, f"examples/README.md's table of the nmtune_study package lacks {missing}"
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "benchmarks").glob("bench_*.py")) if f"| `{p.name}` |" not in bench]
    assert not missing, f"benchmarks/README.md's script table lacks {missing}"


def test_contrastive_class_count_matches_the_data() -> None:
    from nmtune_study.data import clip as clip_data

    n = len(clip_data.CLIP_CHARS)
    records = json.loads((ROOT / "examples" / "results" / "contrastive" / "records.json").read_text())
    pairs = {p["num_pairs"] for p in records["pretrain"].values()}
    settings = json.loads((ROOT / "examples" / "results" / "results.json").read_text())["settings"]
    per_font = (settings.get("clip") or {}).get("per_font", 2)
    assert pairs == {n * len(clip_data.FONTS) * per_font}  # every character in every font, per_font renderings
    for rel in ("README.md", "docs/contrastive.md"):
        text = (ROOT / rel).read_text()
        counts = {int(m) for m in re.findall(r"(\d+) (?:pre-training )?(?:characters|classes)\b", text)}
        assert n in counts and not counts & {n - 1, n + 1}, f"{rel}: {counts}, the data has {n}"
    assert f"chance {100 / n:.1f} %" in (ROOT / "README.md").read_text()


def test_resolution_cut_offs_quoted_in_the_docs() -> None:
    """README and docs/method.md quote sqrt(n eps) sigma_1 at both precisions."""
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    quoted = {"2·10⁻³ σ₁ at\n  n = 32": math.sqrt(32 * eps32), "5.5·10⁻³ σ₁ at n = 256": math.sqrt(256 * eps32),
              "8·10⁻⁸ σ₁ at n = 32": math.sqrt(32 * eps64)}
    readme = (ROOT / "README.md").read_text()
    for phrase, value in quoted.items():
        assert phrase in readme, phrase
        mantissa, exponent = re.match(r"([\d.]+)·10⁻([⁰¹²³⁴⁵⁶⁷⁸⁹]+)", phrase).groups()  # type: ignore[union-attr]
        power = int(exponent.translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")))
        assert abs(float(mantissa) * 10.0**-power / value - 1) < 0.1, (phrase, value)
    method = (ROOT / "docs" / "method.md").read_text()
    assert "2·10⁻³ σ₁ at n = 32 and 5.5·10⁻³ σ₁ at n = 256" in method
    assert "3·10⁻⁴ σ₁" not in _outside_blocks(readme)


def test_resolution_cut_offs_quoted_in_the_docstrings() -> None:
    """The docstrings of ``_kernels`` and ``singular_values`` quote the cut-off the code applies, n = 32."""
    import nmtune._kernels as K

    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    quoted = {"8e-8 sigma_1": math.sqrt(32 * eps64), "2e-3 sigma_1": math.sqrt(32 * eps32)}
    for doc in (K.__doc__, singular_values.__doc__):
        text = " ".join((doc or "").split())
        assert "sqrt(n * eps) * sigma_1" in text and "3e-4" not in text
        for phrase, value in quoted.items():
            assert phrase in text, phrase
            assert abs(float(phrase.split()[0]) / value - 1) < 0.1, (phrase, value)
    assert "``5.5e-3 sigma_1`` at ``n = 256``" in " ".join((K.__doc__ or "").split())  # sqrt(256 eps_32)


@pytest.mark.parametrize("precision, dtype", [("float32", torch.float32), ("float64", torch.float64)])
def test_singular_values_below_the_cut_off_are_zero(precision: str, dtype: torch.dtype) -> None:
    """The spectrum resolves sigma_k down to sqrt(n eps) sigma_1 of the compute dtype, not further."""
    m, d = 32, 48
    cut = math.sqrt(m * torch.finfo(dtype).eps)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    sigma = torch.full((m,), 0.5, dtype=torch.float64)
    sigma[0], sigma[-2], sigma[-1] = 1.0, 3 * cut, 0.3 * cut
    z = (u * sigma) @ v.T
    got = singular_values(z.to(dtype), precision=precision).double()
    assert got[-1] == 0, f"{precision}: {got[-1]:.3g} resolved below the cut-off {cut:.3g}"
    assert abs(got[-2] / (3 * cut) - 1) < 0.5, f"{precision}: {got[-2]:.3g} lost above the cut-off {cut:.3g}"


def test_covariance_scale_quoted_in_method_md() -> None:
    method = (ROOT / "docs" / "method.md").read_text()
    assert "`L_COV ≈ 3.1·10³`, a regularizer `λ L_COV ≈ 31`" in method and "about 1.3·10⁵" in method
    torch.manual_seed(0)
    z4 = torch.randn(64, 768) * 4
    assert 2.8e3 < float(covariance_loss(z4)) < 3.4e3
    assert 28 < float(NMTuneRegularizer(consistency_weight=0.0, singular_value_weight=0.0)(z4)) < 34
    z32 = torch.randn(64, 768) * 32
    assert 1.15e5 < float(NMTuneRegularizer()(z32, torch.randn(64, 768))) < 1.45e5


# ----------------------------------------------------------------------------------------------
# claims about the code


class _Ops(TorchDispatchMode):
    """Records every aten call with its argument and output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[torch.Size], list[torch.Tensor]]] = []
        self.mask_indexing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        self.calls.append((func.overloadpacket, shapes, outs))
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            self.mask_indexing += 1  # a boolean mask: the kernel takes its nonzero() on the host
        return out

    def matmuls(self) -> list[tuple[int, int, int]]:
        """``(rows, inner, cols)`` of every matrix product."""
        out = []
        for op, shapes, _ in self.calls:
            if op in (aten.mm, aten.bmm, aten.matmul) and len(shapes) == 2:
                a, b = shapes
                out.append((a[-2], a[-1], b[-1]))
        return out

    def grams(self, m: int, d: int) -> int:
        n, k = min(m, d), max(m, d)
        return sum(1 for r, inner, c in self.matmuls() if (r, inner, c) == (n, k, n))

    def count(self, *ops: Any) -> int:
        return sum(1 for op, _, _ in self.calls if op in ops)


def _regularizer_ops(m: int, d: int, **config: Any) -> tuple[_Ops, _Ops]:
    return_components = config.pop("return_components", False)
    reg = NMTuneRegularizer(check_finite=False, **config)
    torch.manual_seed(0)
    f = torch.randn(m, d)
    z = (f + 0.1 * torch.randn(m, d)).requires_grad_()
    with _Ops() as fwd:
        out = reg(z, f, return_components=return_components)
    loss = out.loss if return_components else out
    with _Ops() as bwd:
        loss.backward()
    return fwd, bwd


@pytest.mark.parametrize("m, d", [(24, 40), (40, 24)])
@pytest.mark.parametrize("return_components", [False, True])
def test_one_gram_product_and_one_eigh_with_l_svd_on(m: int, d: int, return_components: bool) -> None:
    fwd, bwd = _regularizer_ops(m, d, return_components=return_components)
    assert fwd.grams(m, d) == 1, fwd.matmuls()
    assert fwd.count(aten._linalg_eigh) == 1
    # The hand-written backward: one matmul of the Gram's cost (m d min(m, d) multiply-adds).
    cost = m * d * min(m, d)
    assert sum(1 for r, inner, c in bwd.matmuls() if r * inner * c >= cost) == 1, bwd.matmuls()
    assert bwd.count(aten._linalg_eigh) == 0


@pytest.mark.parametrize("m, d", [(24, 40), (40, 24)])
def test_without_l_svd_the_logged_spectrum_takes_a_second_gram_product(m: int, d: int) -> None:
    """The docs say so: L_COV takes one Gram product, SVE/LSVR for logging a second, detached one."""
    fwd, _ = _regularizer_ops(m, d, singular_value_weight=0.0, return_components=True)
    assert fwd.grams(m, d) == 2 and fwd.count(aten._linalg_eigh) == 1
    fwd, _ = _regularizer_ops(m, d, singular_value_weight=0.0)
    assert fwd.grams(m, d) == 1 and fwd.count(aten._linalg_eigh) == 0


def _square(t: torch.Tensor, d: int) -> bool:
    return t.dim() >= 2 and t.shape[-1] == d and t.shape[-2] == d


@pytest.mark.parametrize("config", [{}, {"singular_value_weight": 0.0}, {"covariance_weight": 0.0}])
def test_no_d_by_d_matrix_when_m_is_below_d(config: dict[str, float]) -> None:
    m, d = 24, 40
    fwd, bwd = _regularizer_ops(m, d, return_components=True, **config)
    made = [(op, tuple(o.shape)) for ops in (fwd, bwd) for op, _, outs in ops.calls for o in outs if _square(o, d)]
    assert not made, f"D x D tensors formed with M < D: {made}"


@pytest.mark.parametrize("m, d", [(24, 40), (40, 24)])
def test_no_d_by_d_mask(m: int, d: int) -> None:
    fwd, bwd = _regularizer_ops(m, d, return_components=True)
    masks = [op for ops in (fwd, bwd) for op, _, outs in ops.calls for o in outs
             if o.dtype == torch.bool and _square(o, d)]
    assert not masks, masks


# Host syncs. On CPU nothing waits, so a sync is counted where it would happen on a GPU: the
# Python-level reads (HostSyncCounter) and the aten ops that need a value or a data-dependent
# shape on the host (``if t.any():``, ``int(t)``, boolean-mask indexing, ``nonzero``).
_SYNC_OPS = (aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive,
             aten._unique2, aten.unique_dim)


def _syncs(fn: Any) -> int:
    with HostSyncCounter() as reads, _Ops() as ops:
        fn()
    return reads.count + ops.count(*_SYNC_OPS) + ops.mask_indexing


@pytest.mark.parametrize("config", [{}, {"singular_value_weight": 0.0}, {"covariance_weight": 0.0}, {"top_k": 3}])
def test_a_loss_step_syncs_only_for_check_finite(config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    f, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    head = torch.nn.Linear(16, 16)
    cls = torch.nn.Linear(16, 4)

    def step(check_finite: bool) -> None:
        z = head(f)
        loss = NMTuneLoss(check_finite=check_finite, **config)(cls(z), y, z, f, return_components=True)
        loss.loss.backward()

    assert _syncs(lambda: step(False)) == 0
    assert _syncs(lambda: step(True)) >= 1


def test_the_sync_count_sees_a_value_read() -> None:
    """The counter is not blind: a branch on a value, a boolean mask and ``.item()`` each count."""
    x = torch.randn(8)
    assert _syncs(lambda: x.sum().item()) >= 1
    assert _syncs(lambda: x[x > 0]) >= 1
    assert _syncs(lambda: bool((x > 0).any())) >= 1


def test_the_distributed_shape_exchange_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documented: the default gather exchanges shapes and reads them on the host (one sync per step)."""
    import torch.distributed as dist

    import nmtune.distributed as ND

    def fake_all_gather(out: list[torch.Tensor], t: torch.Tensor, group: Any = None) -> None:
        for o in out:
            o.copy_(t)

    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    x = torch.randn(5, 3)
    assert _syncs(lambda: ND._exchange_shapes(x, None, 2)) >= 1


def test_reference_cache_lookups_read_keys_on_the_host(tmp_path: Path) -> None:
    """Documented: a ReferenceCache lookup reads its keys on the host."""
    from nmtune.reference_cache import ReferenceCache

    reference = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).requires_grad_(False).eval()
    x = torch.randn(8, 6)
    cache = ReferenceCache(8)
    cache.precompute(reference, [{"x": x, "idx": torch.arange(8)}], features_fn=lambda m, b: m(b["x"]))
    keys = torch.tensor([1, 5, 2])
    assert _syncs(lambda: cache.get(keys)) >= 1
    torch.testing.assert_close(cache.get(keys), reference(x[keys]))


def test_seed_stability_compares_disjoint_seed_sets(tmp_path: Path) -> None:
    stability = _load("seed_stability", ROOT / "tools" / "seed_stability.py")

    def run(name: str, pretrain: list[int], verdicts: list[str]) -> Path:
        d = tmp_path / name
        d.mkdir()
        claims = [{"claim": f"claim {i}", "regime": "supervised", "verdict": v, "estimate": 1.0, "ci_low": 0.5,
                   "ci_high": 1.5, "unit": "points"} for i, v in enumerate(verdicts)]
        (d / "claims.json").write_text(json.dumps(claims))
        (d / "results.json").write_text(json.dumps({"settings": {"pretrain_seeds": pretrain, "seeds": [0, 1]}}))
        return d

    a = run("a", [0, 1], ["reproduced", "inconclusive", "contradicted"])
    b = run("b", [2, 3], ["reproduced", "reproduced", "reproduced"])
    text = stability.compare(a, b, ["cmd a", "cmd b"])
    rows = sync_docs.table_with(text, "claim", "changed")
    assert [r["changed"] for r in rows] == ["", "yes", "yes"]
    assert text.rstrip().endswith("Verdicts flipping between reproduced and contradicted: 1.")
    with pytest.raises(ValueError, match="disjoint"):
        stability.compare(a, run("c", [1, 5], ["reproduced"] * 3), ["cmd a", "cmd c"])
