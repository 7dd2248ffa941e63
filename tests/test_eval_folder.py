"""`fastonestep eval FOLDER`: FD, PRDC and diversity of a folder of PNGs against a folder or a stats .npz."""
import json

import numpy as np
import pytest
from PIL import Image

from fastonestep.cli import main
from fastonestep.eval import compare_features, feature_stats, frechet_distance
from fastonestep.eval.folder_eval import load_folder_images


def _write_pngs(folder, n, seed, shift=0):
    """n small RGB images: smooth random blobs, so nearby images are similar but not equal."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 200, size=(2, 2, 3)).repeat(4, axis=0).repeat(4, axis=1)
        Image.fromarray((base + shift).clip(0, 255).astype(np.uint8), mode="RGB").save(folder / f"{i:03d}.png")
    return folder


def test_eval_image_folder_against_a_folder_and_a_stats_file(tmp_path, capsys):
    gen = _write_pngs(tmp_path / "gen", 30, seed=0)
    ref = _write_pngs(tmp_path / "ref", 40, seed=1, shift=30)
    out, stats = tmp_path / "m.json", tmp_path / "ref.npz"
    assert main(["eval", str(gen), "--features", "raw", "--ref", str(ref), "--k", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["num_images"] == 30 and result["feature_space"] == "raw" and result["prdc_k"] == 3
    # Independent check: the same numbers from the images loaded directly.
    g = load_folder_images(str(gen)).reshape(30, -1).double().numpy()
    r = load_folder_images(str(ref)).reshape(40, -1).double().numpy()
    assert g.shape[1] == 3 * 8 * 8
    expected = compare_features(g, "raw_fd", ref_feats=r, k=3)
    for key in ("raw_fd", "precision", "recall", "density", "coverage", "diversity", "ref_diversity"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key

    # --save-stats on the reference folder, then that .npz as the reference: the same FD, no PRDC.
    assert main(["eval", str(ref), "--features", "raw", "--ref", str(ref), "--save-stats", str(stats)]) == 0
    itself = json.loads(capsys.readouterr().out)
    assert itself["precision"] == itself["recall"] == itself["coverage"] == 1.0 and itself["raw_fd"] < 1e-8
    with np.load(stats) as f:
        assert set(f.files) == {"mu", "sigma"}
        assert np.allclose(f["mu"], r.mean(0)) and f["sigma"].shape == (192, 192)
    assert main(["eval", str(gen), "--features", "raw", "--ref", str(stats), "--json", str(out)]) == 0
    by_stats = json.loads(out.read_text())
    assert by_stats["raw_fd"] == pytest.approx(frechet_distance(*feature_stats(g), *feature_stats(r)), rel=1e-9)
    assert "precision" not in by_stats and by_stats["diversity"] == pytest.approx(result["diversity"])


def test_eval_image_folder_errors(tmp_path, capsys):
    gen = _write_pngs(tmp_path / "gen", 5, seed=0)
    assert main(["eval", str(gen)]) == 2  # 3x8x8 images: no default feature space
    assert "--inception" in capsys.readouterr().err
    assert main(["eval", str(gen), "--features", "raw"]) == 2  # and no default reference
    assert "--ref" in capsys.readouterr().err
    other = _write_pngs(tmp_path / "other", 5, seed=1)
    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(3), sigma=np.eye(3))
    assert main(["eval", str(other), "--features", "raw", "--ref", str(small)]) == 2
    assert "dimension" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    assert "nor a folder of images" in capsys.readouterr().err
