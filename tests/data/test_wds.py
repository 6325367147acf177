"""webdataset tar shards as a random-access source: brace patterns, the cached shard index, decoding of every
member kind, unusable samples skipped and counted, per-process epochs and exact resume through GrainBatches."""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image, features

from multimodal_jax.data import tar_index, wds
from multimodal_jax.data.pipeline import GrainBatches
from multimodal_jax.errors import UserError

SIZE = 8  # images are written at the model's size, so decoded pixels are the written ones (no resize)


def _image(seed: int, mode: str) -> Image.Image:
  """A smooth gradient (JPEG keeps it close) with a per-seed offset, in `mode`."""
  y, x = np.mgrid[:SIZE, :SIZE]
  rgb = np.stack([x * 20 + seed * 7, y * 20 + seed * 3, (x + y) * 10 + 40], -1).astype(np.uint8)
  image = Image.fromarray(rgb, "RGB")
  if mode == "RGBA":
    return Image.fromarray(np.concatenate([rgb, np.full((SIZE, SIZE, 1), 9, np.uint8)], -1), "RGBA")
  return image.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
  """Three shards (txt captions; json captions with a class, a corrupt image and a json without a caption; an
  uneven last shard) and `expected`: key -> (RGB pixels, caption, label, exact)."""
  expected, members = {}, [[], [], []]

  def add(shard, key, mode, fmt, caption=None, json_caption=None, label=None):
    image = _image(len(expected), mode)
    members[shard].append((f"{key}.{fmt.lower().replace('jpeg', 'jpg')}", _encode(image, fmt)))
    if caption is not None:
      members[shard].append((f"{key}.txt", caption.encode()))
    if json_caption is not None:
      members[shard].append((f"{key}.json", json.dumps(json_caption).encode()))
    if label is not None:
      members[shard].append((f"{key}.cls", str(label).encode()))
    text = caption if caption is not None else (json_caption or {}).get("caption", (json_caption or {}).get("text"))
    expected[key] = (np.asarray(image.convert("RGB")), text, -1 if label is None else label, fmt != "JPEG")

  members[0].append(("__index__", b"webdataset skips meta members"))
  add(0, "a0", "RGB", "PNG", caption="a red gradient")
  add(0, "a1", "L", "PNG", caption=" grey ")
  add(0, "a2", "RGBA", "PNG", caption="alpha dropped")
  add(0, "a3", "RGB", "JPEG", caption="a jpeg")
  add(0, "a4", "RGB", "PNG")  # no caption: left out at open
  add(0, "dir/a5", "RGB", "PNG", caption="key keeps its folder")
  members[0].append(("dir/a5.extra.json", b"{}"))  # extension "extra.json": not a caption member
  members[0].append(("README", b"no extension: not a sample member"))
  if features.check("webp"):
    add(1, "b0", "RGB", "WEBP", json_caption={"caption": "a webp"})
  else:
    add(1, "b0", "RGB", "PNG", json_caption={"caption": "a webp"})
  add(1, "b1", "RGB", "PNG", json_caption={"caption": "class three"}, label=3)
  members[1] += [("b2.jpg", b"\xff\xd8 not really a jpeg"), ("b2.json", b'{"caption": "corrupt"}')]
  add(1, "b3", "RGB", "PNG", json_caption={"url": "no caption field"})
  add(1, "b4", "L", "PNG", json_caption={"text": "caption from text"})
  add(2, "c0", "RGB", "PNG", caption="last shard")
  add(2, "c1", "RGBA", "PNG", caption="uneven")
  for number, shard in enumerate(members):
    _write_tar(tmp_path / f"shard-{number:06d}.tar", shard)
  valid = {k: v for k, v in expected.items() if k not in ("a4", "b3")}
  return str(tmp_path / "shard-{000000..000002}.tar"), valid


def _source(pattern, tmp_path, **options):
  return wds.WdsSource(pattern, str(tmp_path / "index"), SIZE, 3, **options)


# Bug: ranges lose zero padding, alternatives or several groups are not combined, `::` lists ignored.
def test_expand_braces():
  assert tar_index.expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
  assert tar_index.expand_braces("x{08..10}") == ["x08", "x09", "x10"]
  assert tar_index.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
  assert tar_index.expand_braces("{a,{b,c}}.tar") == ["a.tar", "b.tar", "c.tar"]
  assert tar_index.expand_braces("p.tar::q{0..1}.tar") == ["p.tar", "q0.tar", "q1.tar"]
  assert tar_index.expand_braces("gs://b/{3..1}.tar") == ["gs://b/3.tar", "gs://b/2.tar", "gs://b/1.tar"]


# Bug: offsets off by a header, members grouped under the wrong key, modes or captions decoded wrongly.
def test_every_sample_decodes_with_its_caption(shards, tmp_path):
  pattern, valid = shards
  source = _source(pattern, tmp_path, resample=False)
  assert len(source) == len(valid) + 2 and source.incomplete_samples == 1  # b2, b3 kept (unusable); a4 left out
  records = [source[i] for i in range(len(source))]
  good = {r["key"]: r for r in records if r["valid"]}
  assert set(good) == set(valid)
  for key, (pixels, caption, label, exact) in valid.items():
    record = good[key]
    assert record["image"].shape == (SIZE, SIZE, 3) and record["image"].dtype == np.uint8
    assert record["caption"] == caption.strip() and record["label"] == label, key
    error = np.abs(record["image"].astype(int) - pixels)
    assert error.max() == 0 if exact else error.mean() < 4, (key, error.max())


# Bug: a corrupt image or a json without a caption raises, is silently trained on, or goes uncounted.
def test_unusable_samples_are_skipped_and_counted(shards, tmp_path):
  pattern, valid = shards
  masked = _source(pattern, tmp_path, resample=False)
  bad = [r for r in (masked[i] for i in range(len(masked))) if not r["valid"]]
  assert len(bad) == 2 and all(not r["image"].any() and r["caption"] == "" for r in bad)
  assert masked.skipped_samples == 2
  assert dict(masked.skip_reasons) == {"undecodable image": 1, "no caption field in json": 1}
  replaced = _source(pattern, tmp_path)
  records = [replaced[i] for i in range(len(replaced))]
  assert all(r["valid"] and r["key"] in valid for r in records)
  assert sum(r["skipped"] > 0 for r in records) == 2 and replaced.skipped_samples == 2
  assert [r["key"] for r in records] == [replaced[i]["key"] for i in range(len(replaced))]  # deterministic


# Bug: every open re-scans every shard (slow on thousands of shards), or a rewritten shard keeps a stale index.
def test_index_is_cached_and_invalidated(shards, tmp_path, monkeypatch):
  pattern, _ = shards
  first = _source(pattern, tmp_path)
  scans = []
  original = tarfile.open
  monkeypatch.setattr(tarfile, "open", lambda *a, **k: scans.append(k.get("fileobj")) or original(*a, **k))
  second = _source(pattern, tmp_path)
  assert scans == [] and len(second) == len(first)
  assert second[0]["key"] == first[0]["key"]
  with original(tmp_path / "shard-000002.tar", "a") as tar:  # the shard changes: one more sample
    info = tarfile.TarInfo("c2.png")
    data = _encode(_image(9, "RGB"), "PNG")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    info = tarfile.TarInfo("c2.txt")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"new"))
  third = _source(pattern, tmp_path)
  assert len(scans) == 1 and len(third) == len(first) + 1
  assert {third[i]["key"] for i in range(len(third))} >= {"c2"}


# Bug: two processes read overlapping records, or some sample is never read in an epoch.
def test_processes_read_disjoint_records_covering_the_epoch(shards, tmp_path):
  pattern, valid = shards
  per_process = []
  sources = [_source(pattern, tmp_path) for _ in range(2)]
  n = len(sources[0])  # 12: 6 records a process, 3 batches of 2
  for index, source in enumerate(sources):
    stream = GrainBatches(source, 4, seed=5, process_index=index, process_count=2)
    batches = [next(stream) for _ in range(n // 4)]
    per_process.append([(k, s) for b in batches for k, s in zip(b["key"], b["skipped"], strict=True)])
  own = [{k for k, skipped in keys if skipped == 0} for keys in per_process]
  assert not own[0] & own[1]
  assert own[0] | own[1] == set(valid)
  assert sum(len(keys) for keys in per_process) == n
  assert sources[0].skipped_samples + sources[1].skipped_samples == 2  # b2 and b3, each read once


# Bug: a restored stream repeats or skips batches, or reads differ after the source is rebuilt.
def test_resume_from_saved_state_is_exact(shards, tmp_path):
  pattern, _ = shards
  whole = GrainBatches(_source(pattern, tmp_path), 4, seed=1)
  expected = [next(whole) for _ in range(7)]
  stopped = GrainBatches(_source(pattern, tmp_path), 4, seed=1)
  for _ in range(4):
    next(stopped)
  state = stopped.get_state()
  resumed = GrainBatches(_source(pattern, tmp_path), 4, seed=1)
  resumed.set_state(state)
  for want in expected[4:]:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


# Bug: a pickled source (grain workers) shares file handles, or evicting idle handles breaks later reads.
def test_pickled_source_and_few_open_files(shards, tmp_path):
  pattern, _ = shards
  source = _source(pattern, tmp_path, max_open=1)
  keys = [source[i]["key"] for i in range(len(source))] * 2
  assert keys == [source[i % len(source)]["key"] for i in range(2 * len(source))]
  copy = pickle.loads(pickle.dumps(source))
  assert copy.skipped_samples == 0  # counts are per process: a worker starts from zero
  assert [copy[i]["key"] for i in range(len(copy))] == keys[: len(source)] and copy.skipped_samples == 2


# Bug: clip_benchmark's eval shards (image + cls, classnames.txt one folder up) are rejected or lose labels.
def test_clip_benchmark_layout(tmp_path):
  split = tmp_path / "cifar" / "test"
  split.mkdir(parents=True)
  (tmp_path / "cifar" / "classnames.txt").write_text("airplane\nautomobile\nbird\n")
  members = []
  for i in range(5):
    members += [(f"s{i}.png", _encode(_image(i, "RGB"), "PNG"))]
    members += [(f"s{i}.cls", f"{i % 3}\n".encode())]
  _write_tar(split / "0.tar", members + [("s5.jpg", b"broken"), ("s5.cls", b"1")])
  source = wds.open_wds(str(split / "*.tar"), None, SIZE, 3, need=("label",), resample=False)
  records = [source[i] for i in range(len(source))]
  assert source.class_names == ("airplane", "automobile", "bird") and source.has_labels and not source.has_captions
  assert [r["label"] for r in records if r["valid"]] == [0, 1, 2, 0, 1]
  assert [r["valid"] for r in records] == [True] * 5 + [False] and source.skipped_samples == 1


# Bug: a missing, non-tar or gzip shard crashes with a traceback, or the message does not name the shard.
def test_bad_shards_are_one_line_user_errors(shards, tmp_path):
  pattern, _ = shards
  missing = str(tmp_path / "shard-000003.tar")
  checks = [
    (pattern.replace("000002}", "000003}"), missing),
    (str(tmp_path / "nothing-*.tar"), "matches no shards"),
  ]
  (tmp_path / "text.tar").write_bytes(b"just some text, not a tar archive" * 40)
  checks.append((str(tmp_path / "text.tar"), "text.tar is not a tar file"))
  (tmp_path / "packed.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 600)
  checks.append((str(tmp_path / "packed.tar.gz"), "gzip"))
  for bad, words in checks:
    with pytest.raises(UserError) as error:
      _source(bad, tmp_path)
    assert words in str(error.value) and "\n" not in str(error.value), str(error.value)


# Bug: our key grouping differs from webdataset's (directory keys, multi-dot names, meta members).
def test_grouping_matches_webdataset(shards, tmp_path):
  webdataset = pytest.importorskip("webdataset")
  pattern, _ = shards
  for path in tar_index.list_shards(pattern):
    index = tar_index.index_shard(path, None)
    ours = [
      (str(key), {str(e) for e, o in zip(index["exts"], offsets, strict=True) if o >= 0})
      for key, offsets in zip(index["keys"], index["offsets"], strict=True)
    ]
    theirs = [
      (s["__key__"], {k for k in s if not k.startswith("__")})
      for s in webdataset.WebDataset(path, shardshuffle=False, empty_check=False)
    ]
    assert ours == theirs
  assert os.path.exists(path)


# Bug: `wds:` is not a SPEC, or a pattern holding ':' (gs://) or braces is cut at the colon or rejected.
def test_wds_specs_parse_with_colons_and_braces():
  from multimodal_jax.data import specs

  for text in ("wds:gs://bucket/shards/{000..009}.tar", "wds:/data/a-{0..3}.tar::/data/b.tar"):
    spec = specs.parse_spec(text, ("captioned_digits",))
    assert spec.kind == "wds" and spec.name == text[4:] and str(spec) == text
    assert specs.spec_rule(("captioned_digits",)).test(text)
  with pytest.raises(UserError, match="wds:PATTERN"):
    specs.parse_spec("webdataset:/data/x.tar")


# Bug: `open_dataset` on shards names fields the samples lack, takes clip_benchmark's class shards as caption
# pairs, or writes the index cache outside the data dir.
def test_open_dataset_fields_and_missing_members(shards, tmp_path):
  from multimodal_jax.data import specs

  pattern, valid = shards
  settings = specs.DataSettings(image_size=SIZE, channels=3, data_dir=str(tmp_path / "data"))
  pairs = specs.open_dataset(f"wds:{pattern}", settings, need=("image", "text"))
  assert pairs.fields == ("image", "text") and len(pairs.split("train")) == len(valid) + 2
  assert {pairs.split("train")[i]["text"] for i in range(len(valid) + 2)} <= {v[1].strip() for v in valid.values()}
  assert len(os.listdir(tmp_path / "data" / "wds_index")) == 3
  labelled = specs.open_dataset(f"wds:{pattern}", settings, want=("label",), resample=False)
  assert labelled.fields == ("image", "label") and len(labelled.split("all")) == 1  # b1, the one with a .cls
  _write_tar(tmp_path / "only-images.tar", [("x.png", _encode(_image(0, "RGB"), "PNG"))])
  with pytest.raises(UserError, match=r"has no captions \(KEY.txt or KEY.json members\), which this use needs"):
    specs.open_dataset(f"wds:{tmp_path / 'only-images.tar'}", settings, need=("image", "text"))


# Bug: evaluation scores unusable samples (as misses) or duplicates, or reads every sample again on each evaluation.
def test_usable_leaves_out_unusable_samples_and_is_cached(shards, tmp_path, monkeypatch):
  pattern, valid = shards
  source = _source(pattern, tmp_path, resample=False).usable(threads=2)
  assert len(source) == len(valid) and source.unusable_samples == 2
  assert dict(source.unusable_reasons) == {"undecodable image": 1, "no caption field in json": 1}
  assert all(source[i]["valid"] for i in range(len(source))) and source.skipped_samples == 0
  assert sorted(path.split("#")[1] for path in source.paths) == sorted(valid)
  monkeypatch.setattr(wds.WdsSource, "_read", lambda self, j: pytest.fail("read again"))
  again = _source(pattern, tmp_path, resample=False).usable()
  assert again.unusable_samples == 2 and dict(again.unusable_reasons) == dict(source.unusable_reasons)
