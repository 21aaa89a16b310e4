"""Bad uploads, corrupt or inconsistent assets, path traversal, unpickling, atomic writes, binding."""

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.app.images import ImageError, open_upload
from clt_explorer.assets.bundle import Bundle, open_bundle, validate_name
from clt_explorer.retrieval.index import ExactIndex, RetrievalIndex
from clt_explorer.retrieval.thumbnails import ThumbnailStore
from clt_explorer.storage import AssetError, atomic_path, write_bytes, write_json

ROOT = Path(__file__).parent.parent
LIMITS = dict(max_bytes=2 * 2**20, max_pixels=4_000_000)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def forged_png_size(data: bytes, width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims another size (a decompression bomb's header)."""
    ihdr = bytearray(data[8:33])  # length, type, 13 data bytes, crc
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return data[:8] + bytes(ihdr) + data[33:]


def exif_rotated_jpeg(path: Path) -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, format="JPEG", exif=exif)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """The corpus: bad uploads with the message each must get, and odd ones that must work."""
    d = tmp_path_factory.mktemp("uploads")
    good = png_bytes(Image.new("RGB", (64, 48), "blue"))
    (d / "notes.png").write_text("this is a text file, not an image")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "bomb.png").write_bytes(forged_png_size(good, 100_000, 100_000))
    Image.new("1", (20000, 20000)).save(d / "huge.png")  # a real 20000 x 20000 image (tiny file)
    Image.new("1", (3000, 3000)).save(d / "large.png")  # over the 4 million pixel setting, under PIL's own limit
    (d / "too_big.png").write_bytes(good + b"\0" * (3 * 2**20))  # 3 MB on disk, over the 2 MB limit
    bad = {"notes.png": "not an image", "truncated.jpg": "truncated or corrupt", "empty.png": "empty",
           "bomb.png": "too large", "huge.png": "too large", "large.png": "too large: 3000 x 3000",
           "too_big.png": "MB"}
    Image.new("RGB", (1, 1), "green").save(d / "one_pixel.png")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16, "I;16").save(d / "sixteen_bit.png")
    Image.new("CMYK", (50, 40), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    frames = [Image.new("P", (30, 30), i) for i in (10, 200)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif_rotated_jpeg(d / "rotated.jpg")
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(d / "transparent.png")
    Image.new("L", (30, 30), 128).save(d / "gray.png")
    ok = ["one_pixel.png", "sixteen_bit.png", "cmyk.jpg", "animated.gif", "rotated.jpg", "transparent.png", "gray.png"]
    return d, bad, ok


def test_each_bad_upload_gets_its_message_and_odd_images_are_converted(uploads):
    folder, bad, ok = uploads
    for name, message in bad.items():
        with pytest.raises(ImageError, match=message):
            open_upload(folder / name, **LIMITS)
    with pytest.raises(ImageError, match="upload an image"):
        open_upload(None)
    for name in ok:
        image = open_upload(folder / name, **LIMITS)
        assert image.mode == "RGB"
    assert open_upload(folder / "rotated.jpg").size == (20, 40)  # EXIF orientation applied
    assert open_upload(folder / "transparent.png").getpixel((0, 0)) == (255, 255, 255)  # composited on white
    sixteen = np.asarray(open_upload(folder / "sixteen_bit.png"))
    assert sixteen.min() == 0 and sixteen.max() == 255  # scaled, not clipped
    assert open_upload(folder / "animated.gif").size == (30, 30)


def test_bad_uploads_through_the_running_app(client, explorer, uploads):
    folder, bad, ok = uploads
    for name, message in bad.items():
        with pytest.raises(Exception) as error:
            client.predict(handle_file(str(folder / name)), "relu_topk", "cls", 0, 3, 3, "cls", api_name="/analyze")
        text = str(error.value)
        # gradio refuses a file over launch(max_file_size=...) itself, before the app sees it
        assert re.search(message, text) or (name == "too_big.png" and "maximum file size" in text), (name, text)
    for name in ok:
        result = client.predict(handle_file(str(folder / name)), "relu_topk", "cls", 0, 3, 3, "cls",
                                api_name="/analyze")
        assert result[1]["label"] in explorer.classifier.classnames, name
    assert client.predict(handle_file(str(explorer.examples()[0])), "abs_topk", "all", 0, 3, 2, "cls",
                          api_name="/analyze")[1]["label"]  # still serving


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.root, target, ignore=shutil.ignore_patterns("thumbnails"))
    return Bundle.load(target)


def test_missing_and_truncated_weights_name_the_file(bundle_copy):
    weights = bundle_copy.clt_weights_path("relu_topk")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError, match=re.escape(str(weights)) + ".*not a readable safetensors"):
        bundle_copy.load_clt("relu_topk")
    weights.unlink()
    with pytest.raises(AssetError, match=re.escape(str(weights)) + ": file is missing"):
        bundle_copy.load_clt("relu_topk")


def test_config_that_does_not_match_the_tensors(bundle_copy):
    config_path = bundle_copy.clt_dir("abs_topk") / "config.json"
    config = json.loads(config_path.read_text())
    config["expansion"] *= 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(AssetError, match="model.safetensors: tensors do not match config.json"):
        bundle_copy.load_clt("abs_topk")
    config["surprise"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(AssetError, match=re.escape(str(config_path)) + ": unknown keys \\['surprise'\\]"):
        bundle_copy.load_clt("abs_topk")


def test_clt_of_another_teacher_is_refused(bundle_copy, random_teacher):
    with pytest.raises(AssetError, match="trained on teacher .* but the bundle's teacher is"):
        bundle_copy.load_clt("relu_topk", random_teacher)


def test_faiss_index_of_the_wrong_dimension(tmp_path):
    folder = tmp_path / "retrieval"
    index = RetrievalIndex({t: [ExactIndex.build(np.eye(4, 8, dtype=np.float32))] for t in ("cls", "patches")},
                           "exact")
    index.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    ExactIndex.build(np.eye(4, 16, dtype=np.float32)).save(folder / manifest["files"]["patches"][0])
    with pytest.raises(AssetError, match="patches_00.faiss: index of 4 x 16, manifest says 4 x 8"):
        RetrievalIndex.load(folder)
    (folder / "cls_00.faiss").write_bytes(b"garbage")
    with pytest.raises(AssetError, match="cls_00.faiss: not a readable FAISS index"):
        RetrievalIndex.load(folder)


def test_bundle_manifest_with_unknown_or_missing_keys(bundle_copy):
    path = bundle_copy.root / "bundle.json"
    manifest = json.loads(path.read_text())
    write_json(path, {**manifest, "colour": "red"})
    with pytest.raises(AssetError, match=re.escape(str(path)) + ": unknown keys \\['colour'\\]"):
        Bundle.load(bundle_copy.root)
    del manifest["teacher"]
    write_json(path, manifest)
    with pytest.raises(AssetError, match="missing keys \\['teacher'\\]"):
        Bundle.load(bundle_copy.root)
    path.write_text("{not json")
    with pytest.raises(AssetError, match="not valid JSON"):
        Bundle.load(bundle_copy.root)


@pytest.mark.parametrize("field,value,message", [
    ("clts", {"relu_topk": "../../outside"}, "leaves the bundle folder"),
    ("clts", {"relu_topk": "/etc"}, "must be a relative path"),
    ("clts", {"../evil": "clts/relu_topk"}, "invalid CLT name"),
    ("teacher", {"model": "local-dir:../../elsewhere"}, "leaves the bundle folder"),
    ("thumbnails", "../thumbs", "leaves the bundle folder"),
])
def test_paths_cannot_leave_the_bundle(bundle_copy, field, value, message):
    path = bundle_copy.root / "bundle.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    write_json(path, manifest)
    with pytest.raises(AssetError, match=message):
        bundle = Bundle.load(bundle_copy.root)
        bundle.thumbnails_dir


def test_names_and_hub_ids_are_validated():
    for name in ("../x", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(AssetError):
            validate_name(name)
    for spec in ("hf://../../etc", "hf://owner", "hf://a/b/c", "hf://own er/x"):
        with pytest.raises(AssetError, match="invalid Hub repo id"):
            open_bundle(spec)
    sys.path.insert(0, str(ROOT))
    import app

    with pytest.raises(AssetError, match="invalid bundle name"):
        app.resolve_bundle("../../no-such-bundle", None)


def test_truncated_thumbnails_are_detected(tiny_bundle, tmp_path):
    target = tmp_path / "thumbnails"
    shutil.copytree(tiny_bundle.thumbnails_dir, target)
    data = (target / "images.bin").read_bytes()
    (target / "images.bin").write_bytes(data[:-10])
    with pytest.raises(AssetError, match="images.bin: missing or truncated"):
        ThumbnailStore(target)


def test_nothing_can_unpickle_or_run_remote_code():
    """No pickle, torch.load only with weights_only=True, np.load never with pickles, no remote code."""
    sources = [*(ROOT / "clt_explorer").rglob("*.py"), ROOT / "app.py", *(ROOT / "scripts").glob("*.py")]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"import pickle|\bpickle\.(load|loads)\(", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
        assert "trust_remote_code" not in text and not re.search(r"(?<![\w.])(eval|exec)\(", text), path


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "bundle.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.json"]  # no temporary file left behind



@pytest.mark.parametrize("durable", [True, False])
def test_only_durable_writes_are_fsynced(tmp_path, monkeypatch, durable):
    """A cache file (the app's served thumbnails) skips the fsync, and is still renamed into place whole."""
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    write_bytes(tmp_path / "thumb.jpg", b"\xff\xd8 jpeg", durable=durable)
    assert (tmp_path / "thumb.jpg").read_bytes() == b"\xff\xd8 jpeg"
    assert len(synced) == int(durable)
    assert [p.name for p in tmp_path.iterdir()] == ["thumb.jpg"]

def test_clt_checkpoint_files_are_complete_or_absent(tmp_path):
    clt = CrossLayerTranscoder(CLTConfig(2, 8, 2, "relu_topk", 4))
    clt.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(CrossLayerTranscoder.from_pretrained(tmp_path).W_enc, clt.W_enc)


def test_app_binds_to_localhost_by_default():
    sys.path.insert(0, str(ROOT))
    import app

    assert app.parse_args([]).host == "127.0.0.1"
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True, check=True)
    assert "127.0.0.1" in done.stdout


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes owner-only files; what the pipeline writes must be readable like any file made with open()."""
    write_json(tmp_path / "written.json", {"a": 1})
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "written.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
