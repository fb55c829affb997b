"""headpag.search.atlas and run_dir on a fake HeadHunter run directory: record reading (truncation, malformed lines), the score grid,
and the two pictures (thumbnails really drawn, heatmap really depends on the scores)."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from headpag.search import atlas, run_dir as runs  # noqa: E402

HEADS_PER_LAYER = [4, 4, 2]
ALL_HEADS = [(layer, head) for layer, n in enumerate(HEADS_PER_LAYER) for head in range(n)]
RED, GREEN, BLUE = (255, 0, 0), (0, 200, 0), (0, 0, 255)
THUMBS = {(0, 1): RED, (0, 0): BLUE, (1, 0): BLUE, (1, 3): BLUE, (2, 0): GREEN}  # the rest are missing


@pytest.fixture(autouse=True)
def _agg(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _mean(layer, head, rnd, scale=1.0):
    return scale * (0.1 * layer + 0.01 * head + rnd)


def _records(scale=1.0):
    """Round 1: every head, nothing selected. Round 2: every head but 0:1 (chosen in round 1)."""
    recs = []
    for rnd, selected in ((1, []), (2, [[0, 1]])):
        for layer, head in ALL_HEADS:
            if [layer, head] in selected:
                continue
            m = _mean(layer, head, rnd, scale)
            recs.append({"round": rnd, "selected": selected, "candidate": [layer, head], "scores": [m, m],
                         "mean": m, "seconds": 0.5})
    return recs


def _write_records(run_dir, recs):
    """Alternate the records over two rank files; rank 1 ends with a line cut short by a crash."""
    for rank in (0, 1):
        lines = [json.dumps(r) for r in recs[rank::2]]
        text = "\n".join(lines) + "\n"
        if rank == 1:
            text += json.dumps(recs[0])[:25]  # truncated trailing line, no newline
        (run_dir / f"records-rank{rank}.jsonl").write_text(text)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "thumbs").mkdir(parents=True)
    settings = {"model_class": "FakeTransformer", "heads_per_layer": HEADS_PER_LAYER,
                "layer_names": [f"blocks.{i}.attn" for i in range(len(HEADS_PER_LAYER))],
                "prompts": ["a cat"], "seeds": [0, 1], "k": 2, "rounds": 2}
    (run / "settings.json").write_text(json.dumps(settings))
    _write_records(run, _records())
    for (layer, head), colour in THUMBS.items():
        Image.new("RGB", (64, 64), colour).save(run / "thumbs" / f"L{layer}_H{head}.png")
    (run / "summary.json").write_text(json.dumps({"heads": [[0, 1, 1.0], [2, 0, 1.0]]}))
    return run


def _rgb(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _mask(img, colour, tol=60):
    return (np.abs(img - np.array(colour)) <= tol).all(axis=-1)


# ----------------------------------------------------------------------------------------------- records


def test_read_records_all_ranks_and_skips_truncated_last_line(run_dir):
    recs = runs.read_records(run_dir)
    assert len(recs) == len(_records()) == 19
    assert sorted(tuple(r["candidate"]) for r in recs if r["round"] == 1) == ALL_HEADS
    assert all(isinstance(r["mean"], float) for r in recs)


def test_read_records_truncated_only_line_and_blank_lines(run_dir):
    (run_dir / "records-rank1.jsonl").write_text('{"round": 1, "sel')
    (run_dir / "records-rank0.jsonl").write_text("\n" + json.dumps(_records()[0]) + "\n\n")
    assert len(runs.read_records(run_dir)) == 1


def test_read_records_malformed_middle_line_names_file_and_line(run_dir):
    path = run_dir / "records-rank0.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:30]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"records-rank0\.jsonl line 3"):
        runs.read_records(run_dir)


def test_read_records_non_record_middle_line_raises(run_dir):
    path = run_dir / "records-rank1.jsonl"
    path.write_text('[1, 2]\n' + path.read_text())
    with pytest.raises(ValueError, match=r"records-rank1\.jsonl line 1"):
        runs.read_records(run_dir)


def test_read_records_empty_run_dir(tmp_path):
    assert runs.read_records(tmp_path) == []


# ----------------------------------------------------------------------------------------------- score grid


def test_score_grid_values_and_chosen_heads(run_dir):
    grid, selected, chosen = atlas.score_grid(run_dir, round=1)
    assert grid.shape == (3, 4)
    assert grid[1, 2] == pytest.approx(_mean(1, 2, 1))
    assert np.isnan(grid[2, 2:]).all()  # layer 2 has only 2 heads
    assert selected == set() and chosen == {(0, 1)}  # from round 2's "selected"

    grid, selected, chosen = atlas.score_grid(run_dir, round=2)
    assert np.isnan(grid[0, 1]) and grid[0, 0] == pytest.approx(_mean(0, 0, 2))
    assert selected == {(0, 1)} and chosen == {(2, 0)}  # last round: from summary.json

    (run_dir / "summary.json").unlink()
    assert atlas.score_grid(run_dir, round=2)[2] is None


def test_score_grid_unknown_round_raises(run_dir):
    with pytest.raises(ValueError, match="no records for round 5"):
        atlas.score_grid(run_dir, round=5)


# ----------------------------------------------------------------------------------------------- pictures


def test_head_atlas_draws_the_thumbnails(run_dir):
    path = atlas.head_atlas(run_dir)
    assert path == run_dir / "atlas.png"
    img = _rgb(path)
    h, w = img.shape[:2]
    assert 200 <= w <= 2000 and 150 <= h <= 2000

    # The red thumbnail is head 1 of layer 0: second of four columns, top of three rows.
    red = _mask(img, RED)
    assert red.sum() > 400
    ys, xs = np.nonzero(red)
    assert w / 4 < xs.mean() < w / 2 and ys.mean() < h / 2
    # The green one is head 0 of layer 2: first column, bottom row.
    ys, xs = np.nonzero(_mask(img, GREEN))
    assert len(xs) > 400 and xs.mean() < w / 4 and ys.mean() > h / 2
    # Missing thumbnails are grey tiles (0.82 grey), e.g. layer 1 head 2.
    assert _mask(img, (209, 209, 209), tol=3).sum() > 400


def test_head_atlas_without_thumbnails_has_no_red(run_dir, tmp_path):
    for p in (run_dir / "thumbs").iterdir():
        p.unlink()
    img = _rgb(atlas.head_atlas(run_dir, tmp_path / "out" / "bare.png"))
    assert _mask(img, RED).sum() == 0


def test_head_atlas_large_grid_stays_sane(tmp_path):
    run = tmp_path / "big"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"model_class": "SD3", "heads_per_layer": [24] * 24,
                                                   "layer_names": [str(i) for i in range(24)]}))
    (run / "thumbs").mkdir()
    Image.new("RGB", (64, 64), RED).save(run / "thumbs" / "L23_H23.png")
    img = _rgb(atlas.head_atlas(run))
    h, w = img.shape[:2]
    assert 1000 <= w <= 2000 and 1000 <= h <= 2000
    ys, xs = np.nonzero(_mask(img, RED))
    assert xs.mean() > 0.9 * w and ys.mean() > 0.9 * h  # bottom-right tile


def test_score_heatmap_written_and_depends_on_scores(run_dir, tmp_path):
    path = atlas.score_heatmap(run_dir)
    assert path == run_dir / "heatmap.png"
    first = _rgb(path)
    h, w = first.shape[:2]
    assert 300 <= w <= 2000 and 250 <= h <= 2000
    assert _mask(first, RED, tol=30).sum() > 20  # the chosen head's box

    again = _rgb(atlas.score_heatmap(run_dir, tmp_path / "again.png"))
    assert np.array_equal(first, again)

    _write_records(run_dir, _records(scale=-1.0))  # reversed order of the scores
    changed = _rgb(atlas.score_heatmap(run_dir, tmp_path / "changed.png"))
    assert changed.shape == first.shape
    assert (np.abs(changed - first).sum(axis=-1) > 30).mean() > 0.02


def _box(mask):
    """(y0, y1, x0, x1): the bounding box of a mask's pixels."""
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_score_heatmap_round_2(run_dir, tmp_path):
    """Round 2's picture: the red box moves to the head chosen in round 2 (layer 2 head 0: bottom row, first
    column; round 1's is layer 0 head 1), and the cell of the head selected in round 1 (not a candidate any more)
    turns light grey where round 1 drew its score."""
    one = _rgb(atlas.score_heatmap(run_dir, tmp_path / "r1.png", round=1))
    two = _rgb(atlas.score_heatmap(run_dir, tmp_path / "r2.png", round=2))
    assert one.shape == two.shape
    red_one, red_two = _mask(one, RED, tol=30), _mask(two, RED, tol=30)
    assert red_one.sum() > 20 and red_two.sum() > 20
    y0, y1, x0, x1 = _box(red_one)
    v0, v1, u0, u1 = _box(red_two)
    cell_h, cell_w = y1 - y0, x1 - x0  # a box is the size of a cell
    # one cell to the left and two rows down (the titles differ, so the axes may move by a few pixels)
    assert abs((u0 - x0) + cell_w) <= 0.1 * cell_w and abs((v0 - y0) - 2 * cell_h) <= 0.1 * cell_h
    assert abs((v1 - v0) - cell_h) <= 0.1 * cell_h and abs((u1 - u0) - cell_w) <= 0.1 * cell_w

    inside = (slice(y0 + 8, y1 - 8), slice(x0 + 8, x1 - 8))  # round 1's chosen cell, inside its box
    grey = _mask(two[inside], (217, 217, 217), tol=3)  # 0.85 grey: not evaluated in round 2
    assert grey.mean() > 0.5, grey.mean()
    assert _mask(one[inside], (217, 217, 217), tol=3).mean() < 0.05  # round 1 drew a score there
    assert (np.abs(two[inside] - one[inside]).sum(axis=-1) > 30).mean() > 0.5


def test_make_atlas_writes_both(run_dir):
    paths = atlas.make_atlas(run_dir)
    assert paths == [run_dir / "atlas.png", run_dir / "heatmap.png"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


def test_missing_settings_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="settings.json"):
        atlas.head_atlas(tmp_path)


def test_missing_matplotlib_message(run_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'headpag\[plots\]'"):
        atlas.head_atlas(run_dir)


# ----------------------------------------------------------------------------------------- issue 15: pictures


def test_robust_range_ignores_a_low_outlier():
    values = [0.999, 0.998, 0.997, 0.996, 0.995, 0.994, 0.783, float("nan")]
    # quartiles of the 7 finite values: q1 = 0.9945, q3 = 0.9975; fence = 0.99: 0.783 falls outside
    assert atlas.robust_range(values) == (0.994, 0.999)
    assert atlas.robust_range([0.5, 0.6, 0.7]) == (0.5, 0.7)  # no outlier: the whole range
    assert atlas.robust_range([0.4, 0.4]) == pytest.approx((-0.1, 0.9))  # constant: +-0.5
    assert atlas.robust_range([]) == (0.0, 1.0)


def test_decimals_separate_the_top_values():
    assert atlas.decimals_for([0.99980, 0.99979, 0.5]) == 5  # 3 or 4 decimals would print them alike
    assert atlas.decimals_for([0.91, 0.82, 0.5]) == 3
    assert atlas.decimals_for([1.0, 0.9999996]) == 6  # capped at 6 even when they still agree there


def test_score_heatmap_has_a_panel_per_round(run_dir, tmp_path):
    one = _rgb(atlas.score_heatmap(run_dir, tmp_path / "r1.png", round=1))
    both = _rgb(atlas.score_heatmap(run_dir, tmp_path / "all.png"))
    assert both.shape[0] == one.shape[0] and abs(both.shape[1] - 2 * one.shape[1]) <= 4
    red_boxes = _mask(both, RED, tol=30)
    assert red_boxes[:, : one.shape[1]].sum() > 20 and red_boxes[:, one.shape[1]:].sum() > 20  # both rounds' picks


def test_score_heatmap_outlier_does_not_flatten_the_top(run_dir, tmp_path):
    """One very low head: its cell is drawn in the 'under' grey, and the other cells still span the colour map
    (with a min-max range they would all be the same yellow)."""
    recs = [r for r in _records() if r["round"] == 1]
    for r in recs:
        if r["candidate"] == [2, 1]:
            r["mean"] = r["scores"][0] = r["scores"][1] = -50.0
    _write_records(run_dir, recs)
    img = _rgb(atlas.score_heatmap(run_dir, tmp_path / "outlier.png", round=1))
    grey = _mask(img, (89, 89, 89), tol=4)  # "0.35" grey, the colour map's under colour
    assert grey.sum() > 400
    purple, yellow = _mask(img, (68, 1, 84), tol=40), _mask(img, (253, 231, 37), tol=40)
    assert purple.sum() > 400 and yellow.sum() > 400  # the ends of viridis: the 0.1-1.2 scores still spread


def _images(n_pairs, heads=ALL_HEADS):
    """Synthetic regenerated images: unguided black, head (l, h) on pair p a grey of its own."""
    black = np.zeros((8, 8, 3), np.uint8)
    by_head = {head: [np.full((8, 8, 3), 40 + 10 * i, np.uint8) for _ in range(n_pairs)]
               for i, head in enumerate(heads)}
    return atlas.AtlasImages(pairs=[("a cat", s) for s in range(n_pairs)], unguided=[black] * n_pairs,
                             by_head=by_head, most_changed={head: 0 for head in heads})


def test_head_atlas_with_every_pair_shows_all_images_and_a_reference(run_dir, tmp_path):
    images = _images(2)
    img = _rgb(atlas.head_atlas(run_dir, tmp_path / "a.png", images=images))
    for i, _ in enumerate(ALL_HEADS):
        assert _mask(img, (40 + 10 * i,) * 3, tol=2).sum() >= 2 * 100, i  # both of the head's images drawn
    black = _mask(img, (0, 0, 0), tol=2)
    ys, xs = np.nonzero(black)
    assert ys.min() < img.shape[0] / 4  # the unguided reference tile sits on top
    # picks of round 1 (0:1) and round 2 (2:0) get their rounds' colours
    for colour in ("tab:orange", "tab:purple"):
        from matplotlib.colors import to_rgb

        assert _mask(img, np.array(to_rgb(colour)) * 255, tol=25).sum() > 100, colour


def test_head_atlas_with_many_pairs_shows_the_most_changed_pair_side_by_side(run_dir, tmp_path):
    images = _images(20)
    images.by_head = {head: {7: imgs[7]} for head, imgs in images.by_head.items()}
    img = _rgb(atlas.head_atlas(run_dir, tmp_path / "b.png", images=images))
    assert _mask(img, (40, 40, 40), tol=2).sum() > 100  # head 0:0's image
    assert _mask(img, (0, 0, 0), tol=2).sum() > len(ALL_HEADS) * 100  # an unguided image next to every head
