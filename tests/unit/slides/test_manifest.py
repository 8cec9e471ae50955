import re

import pytest

from hipt_ray.slides.manifest import ManifestError, list_slides


def test_directory_glob_and_manifest(slide_set, tmp_path):
    d = slide_set["good"].parent
    ids = [s.slide_id for s in list_slides(str(d))]
    assert "good" in ids and "forty" in ids and ids == sorted(ids)
    assert [s.slide_id for s in list_slides(str(d / "f*.svs"))] == ["forty"]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,slide_id,mpp\n{slide_set['nompp']},S1,0.5\n{slide_set['good']},,\n")
    specs = list_slides(str(manifest))
    assert [(s.slide_id, s.mpp) for s in specs] == [("S1", 0.5), ("good", None)]


def test_bad_sources_are_usage_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        list_slides(str(tmp_path / "nowhere"))
    with pytest.raises(ManifestError, match="no slides found"):
        list_slides(str(tmp_path))
    bad = tmp_path / "m.csv"
    bad.write_text("path\nx.svs\n")
    with pytest.raises(ManifestError, match="'uri' column"):
        list_slides(str(bad))


def test_slides_sharing_an_id_are_listed_with_a_reason(tmp_path):
    dup = tmp_path / "d.csv"
    dup.write_text("uri\na/x.svs\nb/x.svs\nc/y.svs\n")
    specs = list_slides(str(dup))
    assert [(s.slide_id, bool(s.error)) for s in specs] == [("x", True), ("x", True), ("y", False)]
    assert "slide id 'x' is shared by 2 files" in specs[0].error and "distinct slide_id" in specs[0].error
    assert str(tmp_path / "a/x.svs") in specs[0].error and str(tmp_path / "b/x.svs") in specs[0].error


def test_a_slide_whose_file_name_makes_an_unsafe_id_fails_alone_with_the_reason(tmp_path):
    long_name, newline = "x" * 230, "two\nlines"
    for name in (long_name, newline, "good"):
        (tmp_path / f"{name}.svs").write_bytes(b"not read here")
    specs = {s.slide_id: s for s in list_slides(str(tmp_path))}
    assert specs["good"].error == ""
    assert "is 230 bytes long (at most 200 in UTF-8)" in specs[long_name].error
    assert "holds the control character '\\n'" in specs[newline].error
    for spec in (specs[long_name], specs[newline]):
        assert "rename the file" in spec.error and "\n" not in spec.error  # one line
    assert specs[long_name].error.startswith(str(tmp_path))
    assert specs[newline].error.startswith(repr(str(tmp_path / "two\nlines.svs")))
    # the same check for a manifest row that names no slide_id (the id comes from the file name)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n{'y' * 240}.svs\n")
    assert "240 bytes long" in list_slides(str(manifest))[0].error


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("z" * 300, "is 300 bytes long"),
        ('"a\nb"', "control character '\\n'"),
        ("a/b", "path separator '/'"),
        ("..", "starts with '.'"),
        ('"tab\there"', "control character '\\t'"),
    ],
)
def test_an_unsafe_slide_id_in_a_manifest_is_a_usage_error_naming_the_line(bad, problem, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,slide_id\nok.svs,fine\nx.svs,{bad}\n")
    with pytest.raises(ManifestError, match=rf"m\.csv, line 3: slide_id .* {re.escape(problem)}.*at most 200 bytes"):
        list_slides(str(manifest))


def test_every_accepted_id_makes_safe_file_names():
    from hipt_ray.config import NAME_MAX_BYTES, name_problem

    longest = "é" * (NAME_MAX_BYTES // 2)
    assert name_problem(longest) is None and name_problem(longest + "é") is not None
    for name in (f"{longest}_slide_attention.png", f"{longest}_{2**31}_{2**31}_mosaic.png", f"{longest}.png"):
        assert len(name.encode()) <= 255  # NAME_MAX on every common file system
