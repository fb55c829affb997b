"""headpag.HeadSet: parsing, validation against tiny models, set operations, JSON save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headpag import HeadSet
from headpag.heads import FORMAT, FORMAT_VERSION
from support import models as M


@pytest.fixture(scope="module")
def model():
    """2 layers x 4 heads."""
    torch.manual_seed(0)
    return M.sd3_transformer(num_layers=2)


@pytest.fixture(scope="module")
def flux():
    """3 layers x 2 heads, another class."""
    return M.flux_transformer()


# --- parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    "1:3,0:2@0.5",
    " 0:2@0.5 , 1:3 ",
    "0:2@.5,1:3@1",
    ["0:2@0.5", "1:3"],
    [(1, 3), (0, 2, 0.5)],
    [[1, 3], [0, 2, 0.5]],
    {0: {2: 0.5}, 1: [3]},
    {"0": {"2": 0.5}, "1": [3]},
])
def test_every_syntax_gives_the_same_set(spec):
    hs = HeadSet(spec)
    assert list(hs) == [(0, 2, 0.5), (1, 3, 1.0)]
    assert hs == HeadSet.from_any(spec)
    assert str(hs) == "0:2@0.5,1:3"
    assert repr(hs) == "HeadSet('0:2@0.5,1:3')"


def test_from_any_returns_a_headset_unchanged():
    hs = HeadSet("0:1")
    assert HeadSet.from_any(hs) is hs
    assert HeadSet(hs) == hs and HeadSet(hs) is not hs


def test_empty():
    for spec in (None, "", "  ", [], {}):
        hs = HeadSet(spec)
        assert not hs and len(hs) == 0 and list(hs) == [] and hs.layers() == [] and str(hs) == ""
    assert HeadSet() == HeadSet("")


def test_queries():
    hs = HeadSet("5:1@0.25,5:0,2:7")
    assert hs.layers() == [2, 5]
    assert hs.u_for(5) == {0: 1.0, 1: 0.25}
    assert list(hs.u_for(5)) == [0, 1]
    assert hs.u_for(3) == {}
    assert len(hs) == 3
    assert list(hs) == [(2, 7, 1.0), (5, 0, 1.0), (5, 1, 0.25)]
    assert (5, 1) in hs and (2, 7) in hs
    assert (5, 2) not in hs and (3, 0) not in hs and "5:1" not in hs


def test_str_roundtrip_keeps_exact_u():
    hs = HeadSet([(0, 0, 0.1), (0, 1, 1 / 3), (3, 2, 0.0), (3, 3, 1.0)])
    assert str(hs) == f"0:0@0.1,0:1@{1 / 3!r},3:2@0.0,3:3"
    assert HeadSet(str(hs)) == hs
    assert eval(repr(hs), {"HeadSet": HeadSet}) == hs


def test_equality_and_hash():
    assert HeadSet("0:1,0:2") == HeadSet([(0, 2), (0, 1)])
    assert HeadSet("0:1") != HeadSet("0:1@0.5")
    assert HeadSet("0:*") != HeadSet("0:0,0:1")
    assert len({HeadSet("0:1,0:2"), HeadSet({0: [2, 1]})}) == 1
    assert HeadSet("0:1") != "0:1"


# --- wildcards --------------------------------------------------------------------------------------------------


def test_wildcard_is_stored_until_resolved(model):
    hs = HeadSet("1:*@0.5,0:2")
    assert not hs.is_resolved
    assert str(hs) == "0:2,1:*@0.5"
    assert hs.layers() == [0, 1]
    assert (1, 3) in hs
    for op in (len, list, lambda h: h.u_for(1)):
        with pytest.raises(ValueError, match=r"1:\*.*resolve"):
            op(hs)
    assert hs.u_for(0) == {2: 1.0}

    resolved = hs.resolve(model)
    assert resolved.is_resolved
    assert list(resolved) == [(0, 2, 1.0)] + [(1, h, 0.5) for h in range(4)]
    assert resolved == hs.validate(model)
    assert resolved == hs.resolve([4, 4])  # a per-layer head count works too
    with pytest.raises(ValueError, match="head 2 .*0:2.* out of range"):
        hs.resolve([1, 2])
    assert HeadSet("1:*").resolve([1, 3]) == HeadSet("1:0,1:1,1:2")
    assert resolved.model_class == "SD3Transformer2DModel" and resolved.heads_per_layer == (4, 4)


@pytest.mark.parametrize("spec", [[(3, "*"), (0, 1, 0.5)], {3: "*", 0: {1: 0.5}}, {3: ["*"], 0: {1: 0.5}}])
def test_wildcard_in_tuples_and_dicts(spec):
    assert HeadSet(spec) == HeadSet("0:1@0.5,3:*")


# --- validation errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, pattern", [
    ("0:1,0:1", r"^duplicate head 0:1$"),
    ("0:1,0:1@0.5", r"^duplicate head 0:1$"),
    ([(2, 3), (2, 3, 0.2)], r"^duplicate head 2:3$"),
    ({1: [0, 0]}, r"^duplicate head 1:0$"),
    ("0:*,0:2", r"^duplicate head 0:2: 0:\* already selects every head of layer 0$"),
    ("0:2,0:*", r"^duplicate head 0:2: 0:\* also selects every head of layer 0$"),
    ("0:*,0:*@0.5", r"^duplicate entry 0:\*$"),
])
def test_duplicates(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        HeadSet(spec)


@pytest.mark.parametrize("spec", ["12", "12:", ":3", "12:3:4", "a:b", "-1:2", "1:-2", "12:3,", "1.5:2", "12:3@",
                                  "12:3 4", "12;3", "12:**"])
def test_bad_strings_name_the_syntax(spec):
    with pytest.raises(ValueError, match=r"bad head spec .*expected 'LAYER:HEAD', 'LAYER:HEAD@U', 'LAYER:\*'"):
        HeadSet(spec)


def test_bad_u_string():
    with pytest.raises(ValueError, match=r"bad u 'x' in head spec '12:3@x'.*expected 'LAYER:HEAD'"):
        HeadSet("12:3@x")


@pytest.mark.parametrize("u", [1.5, -0.1, 1.0000001, math.inf, -math.inf])
def test_u_out_of_range(u):
    with pytest.raises(ValueError, match=r"u=.* for 0:1 is outside the allowed range \[0, 1\]"):
        HeadSet([(0, 1, u)])
    with pytest.raises(ValueError, match=r"outside the allowed range \[0, 1\]"):
        HeadSet(f"0:1@{u}")
    with pytest.raises(ValueError, match=r"outside the allowed range \[0, 1\]"):
        HeadSet("0:1").with_u(u)


def test_u_nan():
    for spec in ([(0, 1, math.nan)], "0:1@nan", {0: {1: float("nan")}}, [(0, "*", math.nan)]):
        with pytest.raises(ValueError, match=r"u is NaN for 0:.*expected a number in \[0, 1\]"):
            HeadSet(spec)
    with pytest.raises(ValueError, match="NaN"):
        HeadSet("0:1").with_u(math.nan)


def test_u_bounds_are_allowed():
    assert list(HeadSet("0:0@0,0:1@1.0")) == [(0, 0, 0.0), (0, 1, 1.0)]


@pytest.mark.parametrize("spec, pattern", [
    ([(-1, 0)], r"layer -1 in -1:0: expected a non-negative integer"),
    ([(0, -2)], r"head -2 in 0:-2: expected a non-negative integer"),
    ([(0.5, 1)], r"layer 0.5 .*non-negative integer"),
    ([(True, 1)], r"layer True .*non-negative integer"),
    ([(0, 1, "a")], r"u='a' for 0:1: expected a number"),
    ([(0,)], r"bad entry \(0,\): expected \(layer, head\), \(layer, head, u\)"),
    ([(0, 1, 0.5, 4)], r"bad entry"),
    ([5], r"bad entry 5"),
    ({0: 3}, r"bad value for layer 0: 3"),
])
def test_bad_entries(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        HeadSet(spec)


def test_bad_type():
    with pytest.raises(TypeError, match="cannot build a HeadSet from float"):
        HeadSet(1.5)


def test_validate_layer_out_of_range(model):
    with pytest.raises(ValueError, match=r"^layer 2 \(in 2:0\) out of range: SD3Transformer2DModel has 2 layers, "
                                         r"allowed 0\.\.1$"):
        HeadSet("0:1,2:0").validate(model)
    with pytest.raises(ValueError, match=r"^layer 7 \(in 7:\*\) out of range: .* has 2 layers, allowed 0\.\.1$"):
        HeadSet("7:*").resolve(model)


def test_validate_head_out_of_range(model):
    with pytest.raises(ValueError, match=r"^head 4 \(in 1:4\) out of range: layer 1 \(transformer_blocks\.1\.attn\) "
                                         r"has 4 heads, allowed 0\.\.3$"):
        HeadSet("1:4").validate(model)


def test_validate_accepts_pipeline_like_and_layer_list(model):
    import types

    from headpag import list_layers

    hs = HeadSet("1:3")
    assert hs.validate(types.SimpleNamespace(transformer=model)) == hs
    assert hs.validate(list_layers(model)) == hs
    with pytest.raises(TypeError, match="unsupported model"):
        hs.validate(torch.nn.Linear(2, 2))


# --- set operations ---------------------------------------------------------------------------------------------


def test_with_u():
    hs = HeadSet("0:1@0.2,1:*")
    half = hs.with_u(0.5)
    assert str(half) == "0:1@0.5,1:*@0.5"
    assert str(hs) == "0:1@0.2,1:*"  # unchanged
    assert hs.with_u(1) == HeadSet("0:1,1:*")


def test_union_later_u_wins():
    a = HeadSet("0:1@0.2,0:2")
    b = HeadSet("0:1@0.7,3:0")
    assert a | b == HeadSet("0:1@0.7,0:2,3:0")
    assert b | a == HeadSet("0:1@0.2,0:2,3:0")
    assert a.union(b, "0:2@0.1") == HeadSet("0:1@0.7,0:2@0.1,3:0")
    assert a | "5:5" == HeadSet("0:1@0.2,0:2,5:5")
    assert "5:5" | a == HeadSet("0:1@0.2,0:2,5:5")
    assert a | [] == a
    assert str(a) == "0:1@0.2,0:2"  # unchanged


def test_union_with_wildcards(model):
    assert HeadSet("0:1,0:2") | "0:*@0.5" == HeadSet("0:*@0.5")
    assert HeadSet("0:*") | "0:*@0.5" == HeadSet("0:*@0.5")
    with pytest.raises(ValueError, match=r"union of 0:\* with explicit heads .*resolve"):
        HeadSet("0:*") | "0:1@0.5"
    assert HeadSet("0:*").resolve(model) | "0:1@0.5" == HeadSet("0:0,0:1@0.5,0:2,0:3")


# --- files ------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path, model):
    hs = HeadSet("1:*@0.25,0:3@0.5,0:0")
    path = tmp_path / "heads.json"
    hs.save(path, model)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == FORMAT_VERSION
    assert data["model_class"] == "SD3Transformer2DModel"
    assert data["layers"] == [{"index": 0, "name": "transformer_blocks.0.attn", "heads": 4},
                              {"index": 1, "name": "transformer_blocks.1.attn", "heads": 4}]
    assert data["entries"] == [[0, 0, 1.0], [0, 3, 0.5]] + [[1, h, 0.25] for h in range(4)]

    resolved = hs.resolve(model)
    for loaded in (HeadSet.load(path), HeadSet.load(str(path), model=model)):
        assert loaded == resolved
        assert loaded.model_class == "SD3Transformer2DModel" and loaded.heads_per_layer == (4, 4)
    # a set resolved earlier remembers its model; save without a model records it
    resolved.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == data


def test_save_without_model_keeps_wildcards(tmp_path, model):
    hs = HeadSet("1:*@0.25,0:3")
    path = tmp_path / "heads.json"
    hs.save(path)
    data = json.loads(path.read_text())
    assert data["model_class"] is None and data["layers"] is None
    assert data["entries"] == [[0, 3, 1.0], [1, "*", 0.25]]
    assert HeadSet.load(path) == hs
    assert HeadSet.load(path, model=model) == hs.resolve(model)
    with pytest.raises(ValueError, match="out of range"):
        HeadSet.load(path, model=[4])


def test_load_refuses_other_class(tmp_path, model, flux):
    path = tmp_path / "heads.json"
    HeadSet("0:1").save(path, model)
    with pytest.raises(ValueError, match=r"heads\.json was written for SD3Transformer2DModel, not "
                                         r"FluxTransformer2DModel"):
        HeadSet.load(path, model=flux)


def test_load_refuses_other_shape(tmp_path, model):
    path = tmp_path / "heads.json"
    HeadSet("0:1").save(path, model)
    with pytest.raises(ValueError, match=r"different shape: file has 2 layers, SD3Transformer2DModel has 3"):
        HeadSet.load(path, model=M.sd3_transformer(num_layers=3))
    with pytest.raises(ValueError, match=r"different shape: layer 0 \(transformer_blocks\.0\.attn\) has 4 heads in "
                                         r"the file, 2 in SD3Transformer2DModel"):
        HeadSet.load(path, model=M.sd3_transformer(num_layers=2, heads=2, head_dim=16))
    with pytest.raises(ValueError, match=r"different shape: file has 2 layers, the model has 3"):
        HeadSet.load(path, model=[4, 4, 4])


def test_load_rejects_bad_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("not json")
    with pytest.raises(ValueError, match="is not a headpag HeadSet file"):
        HeadSet.load(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a headpag HeadSet file"):
        HeadSet.load(path)
    path.write_text(json.dumps({"format": FORMAT, "version": 99, "entries": []}))
    with pytest.raises(ValueError, match="format version 99"):
        HeadSet.load(path)
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "entries": [[0, 1, 1.0], [0, 1, 0.5]]}))
    with pytest.raises(ValueError, match="duplicate head 0:1"):
        HeadSet.load(path)
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "model_class": None,
                                "layers": [{"index": 0, "name": "a", "heads": 2}], "entries": [[0, 2, 1.0]]}))
    with pytest.raises(ValueError, match=r"head 2 \(in 0:2\) out of range: layer 0 \(a\) has 2 heads"):
        HeadSet.load(path)


# --- input types and messages (issue 13) ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [b"1:2", bytearray(b"1:2"), memoryview(b"1:2"), [b"1:2"], [(0, 1), b"1:2"]])
def test_bytes_are_refused_by_type(spec):
    """Bytes iterate as ints: ``HeadSet(b'1:2')`` used to fail on "bad entry 49"."""
    with pytest.raises(TypeError, match="bytes.*decode"):
        HeadSet(spec)


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    want = HeadSet("1:2,3:0")
    assert HeadSet([(np.int64(1), np.uint8(2)), (np.int32(3), np.int16(0))]) == want
    assert HeadSet({np.int64(1): [np.int64(2)], np.int8(3): np.array([0])}) == want
    assert HeadSet(np.array([[1, 2], [3, 0]])) == want  # rows of an index array, e.g. np.argwhere(mask)
    assert HeadSet([np.array([1, 2]), np.array([3, 0])]) == want
    assert HeadSet(torch.tensor([[1, 2], [3, 0]])) == want
    assert HeadSet([(np.int64(1), np.int64(2), np.float32(0.5))]) == HeadSet("1:2@0.5")
    assert HeadSet("0:0").resolve([np.int64(4)]) == HeadSet("0:0")
    with pytest.raises(ValueError, match="layer 1.0 .*non-negative integer"):
        HeadSet(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"u=.*True.* expected a number in \[0, 1\]"):
        HeadSet([(1, 2, np.True_)])
    with pytest.raises(ValueError, match="non-negative integer"):
        HeadSet([(np.True_, 2)])
    with pytest.raises(ValueError, match="bad entry"):
        HeadSet(np.array([[1, 2, 3, 4]]))


@pytest.mark.parametrize("u, pattern", [(2.0, r"^u=2.0 is outside the allowed range \[0, 1\]$"),
                                        (math.nan, r"^u is NaN: expected a number in \[0, 1\]$"),
                                        ("x", r"^u='x': expected a number in \[0, 1\]$")])
def test_u_errors_do_not_name_an_internal_method(u, pattern):
    """``enable(pipe, heads, u=2)`` reached the user as "u=2.0 for with_u is outside ..."."""
    with pytest.raises(ValueError, match=pattern):
        HeadSet("0:1").with_u(u)


def test_a_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"format": "headpag.HeadSet", "note": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"latin1\.json is not a headpag HeadSet file: not UTF-8 text"):
        HeadSet.load(path)
