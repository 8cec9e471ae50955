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
