"""The hierarchy over foundation-model patch encoders, end to end through the CLI (#29 item 2):
tiny twins of a CLS-only encoder (uni_tiny, patch 16) and of a CLS ⊕ mean encoder with registers
(virchow2_tiny, patch 14) embed the same slides into one output side by side, in their native
geometry (16 × 224 px regions); stage-2 DINO pretrains a ViT-4K over virchow2_tiny's 96-d token
grids; a head trains on its embeddings chosen by heads.model_id; its region heatmap and a
similar-region search run over the same encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hipt_ray.cli import main
from hipt_ray.models import load_checkpoint
from hipt_ray.models.registry import create_model
from hipt_ray.slides import synthetic
from hipt_ray.store import REGIONS, SLIDES, Store

from ..conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

UNI = ["model.patch_encoder=uni_tiny"]
VIRCHOW = ["model.patch_encoder=virchow2_tiny"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Four 1.8 mm slides (one full 3584 px region each at 0.5 µm/px), two per subtype."""
    d = tmp_path_factory.mktemp("enc")
    for i in range(4):
        synthetic.make_slide(d / f"e{i}.tiff", width_um=1800, height_um=1800, seed=70 + i, n_blobs=1, subtype=i % 2)
    return d


def _ok(args: list[str], capsys) -> str:
    code = main(args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    return printed


def test_two_encoders_side_by_side_then_pretrain_head_heatmap_and_search(ray_local, slides, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--config", TINY, f"storage.cache_dir={tmp_path / 'c'}", "tiling.min_tissue_fraction=0.05"]
    for encoder in (UNI, VIRCHOW):
        _ok(["embed", "--slides", str(slides), "--out", out, *common, *encoder], capsys)
    store = Store(out)
    ok = store.read(SLIDES).to_pandas().query("status == 'ok' and model_id != ''")
    ids = {m.split("-")[1]: m for m in ok["model_id"]}  # "random-<encoder>-native224-<hash>"
    assert set(ids) == {"uni_tiny", "virchow2_tiny"} and all("native224" in m for m in ids.values())
    assert len(ok) == 8  # each slide once per encoder
    regions = store.read(REGIONS, columns=["model_id", "read_w", "mean256", "mean256_96", "tokens256"]).to_pandas()
    uni, v2 = (regions[regions["model_id"] == ids[k]] for k in ("uni_tiny", "virchow2_tiny"))
    assert set(uni["read_w"]) == set(v2["read_w"]) == {3584}  # 16 × 224 px
    assert len(uni["mean256"].iloc[0]) == 48 and v2["mean256"].isna().all()  # widths side by side
    assert len(v2["mean256_96"].iloc[0]) == 96 and len(v2["tokens256"].iloc[0]) == 256 * 96

    # stage 2 over virchow2_tiny's [96, 16, 16] grids (two models here: pretrain.model_id chooses)
    pre = ["pretrain", "--stage", "vit4k", "--out", out, *common, *VIRCHOW, f"pretrain.model_id={ids['virchow2_tiny']}"]
    _ok([*pre, "pretrain.steps_per_epoch=2", "pretrain.epochs=1", "pretrain.batch_size_per_worker=2"], capsys)
    teacher = create_model("vit4k_tiny", in_dim=96)
    load_checkpoint(teacher, str(Path(out) / "pretrain" / "hipt-pretrain" / "teacher_vit4k.pth"))
    with torch.no_grad():
        assert teacher(torch.randn(1, 96, 16, 16)).shape == (1, 32)

    # a head: without heads.model_id the two models are listed; with it, it trains
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"slide_id": [f"e{i}" for i in range(4)], "case_id": [f"c{i}" for i in range(4)], "label": ["a", "b"] * 2}
    ).to_csv(labels, index=False)
    head = ["train-head", "--out", out, "--labels", str(labels), "--task", "subtyping", "heads.folds=2"]
    head += ["heads.epochs=2", "heads.val_fraction=0", "heads.head=abmil"]
    assert main(head) == 2
    told = "".join(capsys.readouterr())  # the one-line error (stderr) with exit code 2
    assert "2 models" in told and ids["uni_tiny"] in told and "heads.model_id" in told
    printed = _ok([*head, f"heads.model_id={ids['virchow2_tiny']}"], capsys)
    assert ids["virchow2_tiny"] in printed

    # heatmap: virchow2_tiny's own last-block attention (registers left out) under ViT-4K
    hm = tmp_path / "hm"
    _ok(["heatmap", "--slide", str(slides / "e0.tiff"), "--region", "0,0", "--out", str(hm), *common, *VIRCHOW], capsys)
    att = np.load(next(hm.glob("*_attention.npz")))
    assert att["vit256"].shape == (2, 256, 256)  # 2 heads, 16 × 16 patches of 16 × 16 tokens (14 px)
    assert np.isclose(att["hierarchical"].sum(), 1.0)

    # search among virchow2_tiny's regions: the query region comes first at distance ≈ 0
    found = _ok(
        ["search", "--out", out, "--slide", "e1", "--region", "10,10", f"search.model_id={ids['virchow2_tiny']}"],
        capsys,
    )
    assert "e1" in found.splitlines()[1]
