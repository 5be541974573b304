"""The webdataset pipeline: sample parsing, image modes, bad data, splitting, mixing."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmoe.data import pipeline, resumable
from vlmoe.data import (
    Batch,
    DataSource,
    Sample,
    Split,
    build_dataset,
    build_loader,
    decode_image,
    split_for,
)


def png(colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (4, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def noisy_png(seed: int) -> bytes:
    """A PNG of a few KB (random pixels do not compress), so a cut can land inside its data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes | str]]) -> list[int]:
    """Write members in order; return each member's header offset."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = data.encode() if isinstance(data, str) else data
            offsets.append(tar.offset)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return offsets


def caption_members(key: str, text: str = "a caption") -> list[tuple[str, bytes | str]]:
    return [(f"{key}.png", png()), (f"{key}.txt", text)]


def keys_and_skips(batches: list[Batch]) -> tuple[list[str], Counter[str]]:
    keys = [s.key for b in batches if b.size for s in b.data]
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    return keys, skipped


# ---------------------------------------------------------------------------------------- samples


def test_img2dataset_shard_loads_as_caption_data(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (6, 4), (0, 90, 0)).save(jpeg, format="JPEG")
    meta = {"url": "http://example.com/a.jpg", "key": "000000001", "status": "success", "caption": "a green field",
            "width": 6, "height": 4, "original_width": 600, "original_height": 400, "exif": "{}", "sha256": "ab"}
    write_tar(tmp_path / "00000.tar", [
        ("000000001.jpg", jpeg.getvalue()), ("000000001.txt", "a green field"), ("000000001.json", json.dumps(meta)),
    ])
    [batch] = list(build_dataset(DataSource(str(tmp_path / "00000.tar"), "caption"), train=False, batch_size=4))
    [sample] = batch.data
    assert isinstance(sample, Sample)
    assert (sample.key, sample.task, sample.captions, sample.image_id) == ("000000001", "caption", ["a green field"],
                                                                           "000000001")
    assert sample.url == str(tmp_path / "00000.tar")
    assert sample.image.mode == "RGB" and sample.image.size == (6, 4)
    assert sample.meta["url"] == "http://example.com/a.jpg" and "caption" not in sample.meta
    assert (sample.question, sample.answers, sample.question_id, sample.question_type) == (None, [], None, None)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def pixels(image: Image.Image) -> list[tuple[int, ...]]:
    assert image.mode == "RGB"
    return [tuple(p) for p in np.asarray(image).reshape(-1, 3).tolist()]


def test_every_mode_becomes_rgb() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent: white after compositing
    assert pixels(decode_image(_encode(rgba, "PNG"))) == [(0, 0, 255), (255, 255, 255)]
    la = Image.new("LA", (1, 1), (0, 0))
    assert pixels(decode_image(_encode(la, "PNG"))) == [(255, 255, 255)]
    grey = Image.new("L", (1, 1), 77)
    assert pixels(decode_image(_encode(grey, "PNG"))) == [(77, 77, 77)]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert pixels(decode_image(_encode(palette, "PNG", transparency=1))) == [(10, 20, 30), (255, 255, 255)]
    cmyk = decode_image(_encode(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk.mode == "RGB" and cmyk.getpixel((1, 1))[0] > 200 and cmyk.getpixel((1, 1))[1] < 60


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(_encode(image, "PNG", exif=exif))
    assert decoded.size == (2, 4)
    assert decoded.getpixel((1, 0)) == (255, 255, 255)  # top-left moved to top-right


def test_decompression_bomb_guard_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 4x4 = 16 pixels > 10: warning; 10x10 > 2x: error
    write_tar(tmp_path / "s.tar", [("big.png", png(size=(10, 10))), ("big.txt", "x"), *caption_members("ok")])
    with pytest.warns(Image.DecompressionBombWarning):
        batches = list(build_dataset(DataSource(str(tmp_path / "s.tar"), "caption"), train=False, batch_size=4))
    keys, skipped = keys_and_skips(batches)
    assert keys == ["ok"] and skipped == {"bad_image": 1}


# ----------------------------------------------------------------------------------- bad data


@pytest.fixture
def damaged(tmp_path: Path) -> dict[str, object]:
    """Shard 0 holds one sample of every kind of damage and ends in a truncated member; shard 1 is
    fine; shard 2 is not a tar file."""
    members = [
        *caption_members("k0"),
        ("k1.png", b"\x89PNG\r\n\x1a\n garbage"), ("k1.txt", "corrupt image"),
        ("k2.png", png()), ("k2.json", json.dumps({"source": "no caption"})),
        ("k3.png", png()), ("k3.txt", "x"), ("k3.json", "[1, 2"),
        ("k4.txt", "no image"),
        *caption_members("k5"),
        ("k6.txt", "truncated image"), ("k6.png", noisy_png(0)),
    ]
    offsets = write_tar(tmp_path / "s-0.tar", members)
    raw = (tmp_path / "s-0.tar").read_bytes()
    (tmp_path / "s-0.tar").write_bytes(raw[: offsets[-1] + 512 + 1000])  # cut inside k6.png's data
    write_tar(tmp_path / "s-1.tar", [*caption_members("k7"), *caption_members("k8"), *caption_members("k9")])
    (tmp_path / "s-2.tar").write_bytes(bytes(range(256)) * 8)
    return {
        "pattern": str(tmp_path / "s-{0..2}.tar"),
        "keys": ["k0", "k5", "k7", "k8", "k9"],
        "skipped": {"bad_image": 1, "missing_text": 1, "bad_json": 1, "missing_image": 1, "truncated": 1,
                    "unreadable_shard": 1},
    }


def test_bad_samples_are_skipped_counted_and_named(damaged: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vlmoe.data.pipeline"):
        batches = list(build_dataset(DataSource(damaged["pattern"], "caption"), train=False, batch_size=5))
    keys, skipped = keys_and_skips(batches)
    assert keys == damaged["keys"]
    assert skipped == damaged["skipped"]
    # each batch carries the counts met since the previous one; a last empty batch carries the rest
    assert [(b.size, b.skipped) for b in batches] == [
        (5, {k: v for k, v in damaged["skipped"].items() if k != "unreadable_shard"}), (0, {"unreadable_shard": 1})]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 6
    for key, reason in [("k1", "bad_image"), ("k2", "missing_text"), ("k3", "bad_json"), ("k4", "missing_image"),
                        ("k6", "truncated")]:
        assert f"sample '{key}' of shard {damaged['pattern'].replace('{0..2}', '0')}: {reason}" in messages
    assert f"shard {damaged['pattern'].replace('{0..2}', '2')}: unreadable_shard" in messages


def test_skip_counts_reach_the_caller_through_workers(damaged: dict) -> None:
    loader = build_loader(DataSource(damaged["pattern"], "caption"), train=False, batch_size=2, num_workers=2)
    keys = sorted(s.key for batch in loader for s in batch)
    assert keys == damaged["keys"]
    assert loader.stats.skipped == damaged["skipped"]
    assert loader.stats.samples == 5 and loader.stats.num_skipped == 6
    assert sorted(s.key for batch in loader for s in batch) == keys  # a second pass starts the counts again
    assert loader.stats.skipped == damaged["skipped"]


def test_archive_cut_inside_a_header_drops_the_sample_being_read(tmp_path: Path) -> None:
    offsets = write_tar(tmp_path / "s.tar", [*caption_members("a"), *caption_members("b"), *caption_members("c")])
    raw = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(raw[: offsets[4] + 100])  # inside the header of c.png
    batches = list(build_dataset(DataSource(str(tmp_path / "s.tar"), "caption"), train=False, batch_size=8))
    keys, skipped = keys_and_skips(batches)
    assert keys == ["a"] and skipped == {"truncated": 1}  # b may have lost members: dropped as well


@pytest.mark.parametrize("record", ["index", "img2dataset"])
def test_a_damaged_shard_counts_every_sample_it_lost(tmp_path: Path, record: str) -> None:
    """With the shard's sample count recorded (a prepare script's index.json, img2dataset's
    NAME_stats.json), a truncated shard counts the samples it lost, an unreadable one all of them."""
    (tmp_path / "shards").mkdir()
    keys = [f"k{i}" for i in range(6)]
    offsets = write_tar(tmp_path / "shards" / "s-0.tar", [m for key in keys for m in caption_members(key)])
    raw = (tmp_path / "shards" / "s-0.tar").read_bytes()
    (tmp_path / "shards" / "s-0.tar").write_bytes(raw[: offsets[4] + 100])  # inside the header of k2.png
    (tmp_path / "shards" / "s-1.tar").write_bytes(bytes(range(256)) * 8)
    if record == "index":
        (tmp_path / "index.json").write_text(json.dumps(
            {"caption/train": {"shards": {"shards/s-0.tar": 6, "shards/s-1.tar": 4}}}))
    else:
        for name, count in (("s-0", 6), ("s-1", 4)):
            (tmp_path / "shards" / f"{name}_stats.json").write_text(json.dumps({"count": 7, "successes": count}))
    batches = list(build_dataset(DataSource(str(tmp_path / "shards" / "s-{0..1}.tar"), "caption"), train=False,
                                 batch_size=8))
    loaded, skipped = keys_and_skips(batches)
    assert loaded == ["k0"] and skipped == {"truncated": 5, "unreadable_shard": 4}  # k1 (being read) .. k5


def test_truncated_gzip_shard_keeps_what_came_before(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(20)]
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        for key in keys:
            for name, data in [(f"{key}.png", noisy_png(len(key))), (f"{key}.txt", b"text")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = (tmp_path / "s.tar.gz").read_bytes()
    (tmp_path / "s.tar.gz").write_bytes(raw[: len(raw) // 2])
    batches = list(build_dataset(DataSource(str(tmp_path / "s.tar.gz"), "caption"), train=False, batch_size=8))
    loaded, skipped = keys_and_skips(batches)
    assert 0 < len(loaded) < len(keys) - 1 and loaded == keys[: len(loaded)]
    assert skipped == {"truncated": 1}


def test_duplicate_member_drops_the_sample(tmp_path: Path) -> None:
    write_tar(tmp_path / "s.tar", [*caption_members("a"), ("a.txt", "again"), *caption_members("b")])
    keys, skipped = keys_and_skips(list(build_dataset(DataSource(str(tmp_path / "s.tar"), "caption"), train=False,
                                                      batch_size=8)))
    assert keys == ["b"] and skipped == {"duplicate_member": 1}


def test_vqa_sample_needs_question_and_answers(tmp_path: Path) -> None:
    def vqa(key: str, **meta: object) -> list[tuple[str, bytes | str]]:
        return [(f"{key}.png", png()), (f"{key}.json", json.dumps(meta))]

    write_tar(tmp_path / "s.tar", [
        *vqa("ok", question="q?", answers=["a", "b"], question_id=3, image_id=9, question_type="t", extra=1),
        *vqa("noanswers", question="q?", answers=[]),
        *vqa("noquestion", answers=["a"]),
        *caption_members("caption_only"),
    ])
    batches = list(build_dataset(DataSource(str(tmp_path / "s.tar"), "vqa"), train=False, batch_size=8))
    keys, skipped = keys_and_skips(batches)
    assert keys == ["ok"] and skipped == {"missing_text": 3}
    sample = batches[0].data[0]
    assert (sample.question, sample.answers, sample.question_id, sample.image_id, sample.question_type, sample.meta) \
        == ("q?", ["a", "b"], 3, 9, "t", {"extra": 1})


# ----------------------------------------------------------------------------------- patterns


def test_a_pattern_matching_nothing_is_a_value_error_naming_it(tmp_path: Path) -> None:
    write_tar(tmp_path / "a-0.tar", caption_members("x"))
    for pattern in [str(tmp_path / "nothing-*.tar"), str(tmp_path / "a-{0..1}.tar"), str(tmp_path / "none.tar")]:
        with pytest.raises(ValueError, match="matches no file") as info:
            build_dataset([DataSource(str(tmp_path / "a-0.tar"), "caption"), DataSource(pattern, "vqa")],
                          train=True, batch_size=1)
        assert pattern in str(info.value)
    with pytest.raises(ValueError, match="task='qa'"):
        DataSource(str(tmp_path / "a-0.tar"), "qa")
    with pytest.raises(ValueError, match="rank=2"):
        build_dataset(DataSource(str(tmp_path / "a-0.tar"), "caption"), train=False, batch_size=1, rank=2,
                      world_size=2)


def test_a_folder_or_list_names_its_tars(tmp_path: Path) -> None:
    for i in range(2):
        write_tar(tmp_path / f"d-{i}.tar", caption_members(f"k{i}"))
    for pattern in [str(tmp_path), [str(tmp_path / "d-0.tar"), str(tmp_path / "d-1.tar")]]:
        keys, _ = keys_and_skips(list(build_dataset(DataSource(pattern, "caption"), train=False, batch_size=4)))
        assert keys == ["k0", "k1"]


# ----------------------------------------------------------------------------------- splitting


def test_split_for_deals_shards_then_samples() -> None:
    assert split_for(8, rank=1, world_size=2, worker=1, num_workers=2) == Split(3, 4, 0, 1)
    assert split_for(4, rank=0, world_size=2, worker=1, num_workers=2) == Split(1, 4, 0, 1)
    assert split_for(3, rank=1, world_size=2, worker=0, num_workers=2) == Split(0, 1, 2, 4)
    assert split_for(1, rank=0, world_size=1, worker=0, num_workers=1) == Split(0, 1, 0, 1)


@pytest.mark.parametrize("num_shards", [1, 3, 5])
def test_eval_sees_every_sample_once_over_ranks_and_workers(tmp_path: Path, num_shards: int) -> None:
    expected = []
    for shard in range(num_shards):
        members = []
        for i in range(7):
            key = f"s{shard}_{i}"
            members += caption_members(key)
            expected.append(key)
        members += [(f"s{shard}_bad.png", b"not an image"), (f"s{shard}_bad.txt", "x")]
        write_tar(tmp_path / f"e-{shard}.tar", members)
    source = DataSource(str(tmp_path / f"e-{{0..{num_shards - 1}}}.tar"), "caption")
    seen: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for rank in range(2):
        loader = build_loader(source, train=False, batch_size=3, rank=rank, world_size=2, num_workers=2)
        seen.update(s.key for batch in loader for s in batch)
        skipped.update(loader.stats.skipped)
        assert loader.stats.samples > 0  # every rank gets data
    assert sorted(seen) == sorted(expected) and set(seen.values()) == {1}
    assert skipped == {"bad_image": num_shards}  # each bad sample counted once, not once per reader


# ----------------------------------------------------------------------------------- training


@pytest.fixture
def two_tasks(tmp_path: Path) -> tuple[DataSource, DataSource]:
    write_tar(tmp_path / "cap.tar", [m for i in range(10) for m in caption_members(f"c{i}")])
    vqa = []
    for i in range(10):
        meta = {"question": "q?", "answers": ["a"], "question_id": i}
        vqa += [(f"v{i}.png", png()), (f"v{i}.json", json.dumps(meta))]
    write_tar(tmp_path / "vqa.tar", vqa)
    return DataSource(str(tmp_path / "cap.tar"), "caption", weight=3.0), DataSource(str(tmp_path / "vqa.tar"), "vqa")


def _train_keys(sources: tuple[DataSource, DataSource], seed: int, batches: int = 50) -> list[str]:
    dataset = build_dataset(sources, train=True, batch_size=8, seed=seed, shuffle_buffer=5)
    keys = []
    for batch, _ in zip(dataset, range(batches)):
        assert batch.size == 8
        keys += [s.key for s in batch.data]
    return keys


def test_training_mixes_by_weight_repeats_and_shuffles(two_tasks: tuple[DataSource, DataSource]) -> None:
    keys = _train_keys(two_tasks, seed=0)
    assert len(keys) == 400  # 20 samples on disk: the stream repeats
    captions = [k for k in keys if k.startswith("c")]
    assert 0.68 < len(captions) / len(keys) < 0.82  # weight 3 : 1
    per_key = Counter(captions)
    assert sorted(per_key) == [f"c{i}" for i in range(10)]
    assert max(per_key.values()) - min(per_key.values()) <= 2  # read in epochs, not resampled at random
    assert captions[:10] != [f"c{i}" for i in range(10)]  # shuffled
    assert _train_keys(two_tasks, seed=0) == keys  # seeded
    assert _train_keys(two_tasks, seed=1) != keys


def add_task_name(samples: list[Sample]) -> dict[str, object]:
    return {"tasks": [s.task for s in samples], "n": len(samples)}


def test_collate_makes_the_batch(two_tasks: tuple[DataSource, DataSource]) -> None:
    loader = build_loader(two_tasks[1], train=False, batch_size=4, collate=add_task_name, num_workers=1)
    assert [b["n"] for b in loader] == [4, 4, 2]  # eval keeps the last partial batch
    dataset = build_dataset(two_tasks[1], train=False, batch_size=4, drop_last=True, collate=add_task_name)
    assert [b.data["n"] for b in dataset] == [4, 4]


def test_transform_is_applied_per_sample(two_tasks: tuple[DataSource, DataSource]) -> None:
    def tag(sample: Sample) -> Iterator[Sample]:
        sample.meta["seen"] = True
        yield sample

    batches = build_dataset(two_tasks[0], train=False, batch_size=10, transform=tag)
    assert all(s.meta == {"seen": True} for b in batches for s in b.data)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_training_stream_resumes_from_its_position_reading_one_shard_per_source(
    tmp_path: Path, num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batches after a saved position equal the uninterrupted stream's, over shard and epoch
    ends; resuming opens at most one shard per source before its first batch."""
    for source in ("a", "b"):
        for shard in range(3):
            write_tar(tmp_path / f"{source}-{shard}.tar",
                      [m for i in range(7) for m in caption_members(f"{source}{shard}_{i}")])
    sources = [DataSource(str(tmp_path / "a-{0..2}.tar"), "caption", 2.0),
               DataSource(str(tmp_path / "b-{0..2}.tar"), "caption")]

    def loader(position=None):
        return build_loader(sources, train=True, batch_size=3, shuffle_buffer=4, seed=5, num_workers=num_workers,
                            position=position)

    stream = iter(loader())
    expected = [[s.key for s in next(stream)] for _ in range(40)]  # 120 samples: over 2 epochs of both
    for stop in (1, 7, 13, 29):
        interrupted = loader()
        batches = iter(interrupted)
        for _ in range(stop):
            next(batches)
        position = json.loads(json.dumps(interrupted.position))  # as a checkpoint keeps it
        resumed = iter(loader(position))
        assert [[s.key for s in next(resumed)] for _ in range(40 - stop)] == expected[stop:], stop

    opened = []
    real_read_shard = pipeline.read_shard  # counted in this process: without workers

    def read_shard(url, fields=None):
        opened.append(url)
        return real_read_shard(url, fields)

    monkeypatch.setattr(resumable, "read_shard", read_shard)
    interrupted = build_loader(sources, train=True, batch_size=3, shuffle_buffer=4, seed=5)
    batches = iter(interrupted)
    for _ in range(29):
        next(batches)
    opened.clear()
    next(iter(build_loader(sources, train=True, batch_size=3, shuffle_buffer=4, seed=5,
                           position=interrupted.position)))
    assert 1 <= len(opened) <= 2, opened


def conversation_shard(path: Path, questions_per_image: list[int], bad: tuple[str, ...] = ()) -> None:
    """VQA samples ``i{image}q{turn}``, the questions about one image in a row (as a VQAv2 prepare
    writes them); the keys in ``bad`` have an unreadable json member."""
    members = []
    for image, count in enumerate(questions_per_image):
        for turn in range(count):
            key = f"i{image}q{turn}"
            meta = {"question": f"q{turn} of {image}?", "answers": [f"a{turn}"]}
            members += [(f"{key}.png", noisy_png(image)), (f"{key}.json", "{" if key in bad else json.dumps(meta))]
    write_tar(path, members)


def test_a_conversation_source_trains_the_questions_of_one_image_as_one_sample(tmp_path: Path) -> None:
    conversation_shard(tmp_path / "v.tar", [3, 2, 1, 2], bad=("i1q1", "i3q0"))
    source = DataSource(str(tmp_path / "v.tar"), "vqa", conversations=True)
    batches = list(itertools.islice(build_dataset(source, train=True, batch_size=4, shuffle_buffer=1), 1))
    samples = batches[0].data
    assert [(s.key, s.question, s.followups) for s in samples] == [
        ("i0q0", "q0 of 0?", [("q1 of 0?", ["a1"]), ("q2 of 0?", ["a2"])]),
        ("i1q0", "q0 of 1?", []),  # its follow-up is unreadable: skipped and counted
        ("i2q0", "q0 of 2?", []),
        ("i3q1", "q1 of 3?", []),  # the first turn is unreadable: the next opens the conversation
    ]
    assert batches[0].skipped == {"bad_json": 2}
    plain = list(build_dataset(DataSource(str(tmp_path / "v.tar"), "vqa"), train=False, batch_size=8))
    assert sum(b.size for b in plain) == 6 and all(not s.followups for b in plain for s in b.data)  # eval: one by one
    with pytest.raises(ValueError, match="conversations groups the questions of a vqa source, not a caption one"):
        DataSource(str(tmp_path / "v.tar"), "caption", conversations=True)


def test_a_conversation_stream_resumes_from_its_position(tmp_path: Path) -> None:
    for shard in range(2):
        conversation_shard(tmp_path / f"v-{shard}.tar", [3, 1, 2, 3, 2])
    source = DataSource(str(tmp_path / "v-{0..1}.tar"), "vqa", conversations=True)

    def loader(position=None):
        return build_loader(source, train=True, batch_size=2, shuffle_buffer=3, seed=1, position=position)

    stream = iter(loader())
    expected = [[(s.key, len(s.followups)) for s in next(stream)] for _ in range(12)]  # over 2 epochs of 10 images
    for stop in (2, 5, 8):
        interrupted = loader()
        batches = iter(interrupted)
        for _ in range(stop):
            next(batches)
        resumed = iter(loader(json.loads(json.dumps(interrupted.position))))
        assert [[(s.key, len(s.followups)) for s in next(resumed)] for _ in range(12 - stop)] == expected[stop:], stop


def test_training_without_readable_data_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    dataset = build_dataset(DataSource(str(tmp_path / "bad.tar"), "caption"), train=True, batch_size=2)
    with pytest.raises(RuntimeError, match="no readable sample"):
        next(iter(dataset))


@pytest.mark.parametrize("where", ["reader", "transform"])
def test_training_where_every_sample_is_skipped_raises_instead_of_waiting(tmp_path: Path, where: str) -> None:
    """Every sample dropped, by the parser (bad JSON) or by the loader's transform (e.g. too long):
    an error after one whole pass that names the reason and a sample; beside a good source the
    same samples are skipped and counted, and training goes on."""
    bad = [m for i in range(3) for m in [(f"b{i}.png", png()), (f"b{i}.json", "[1, 2" if where == "reader" else '{"captions": ["x"]}')]]
    write_tar(tmp_path / "bad.tar", bad)
    good = [m for i in range(3) for m in [(f"g{i}.png", png()), (f"g{i}.txt", "a red square")]]
    write_tar(tmp_path / "good.tar", good)

    def drop_bad(sample):  # what TrainingCollate.fit does to a sample too long for the model
        yield resumable.Skipped("too_long", sample.url, sample.key, "longer than 10") if sample.key.startswith("b") else sample

    transform = drop_bad if where == "transform" else None
    reason = "bad_json" if where == "reader" else "too_long"
    alone = build_dataset(DataSource(str(tmp_path / "bad.tar"), "caption"), train=True, batch_size=2, transform=transform)
    with pytest.raises(RuntimeError, match=rf"every training sample is skipped.*{reason}: \d+.*'b\d' of shard .*bad.tar"):
        next(iter(alone))
    mixed = build_dataset([DataSource(str(tmp_path / "bad.tar"), "caption"), DataSource(str(tmp_path / "good.tar"), "caption")],
                          train=True, batch_size=2, transform=transform, shuffle_buffer=1)
    batches = list(itertools.islice(iter(mixed), 20))
    assert all(sample.key.startswith("g") for batch in batches for sample in batch.data)
    assert sum(batch.skipped.get(reason, 0) for batch in batches) > 0


def test_training_samples_know_their_epoch_and_random_caption_targets_are_drawn_anew_each_epoch(tmp_path: Path) -> None:
    """A training stream stamps each sample with the passes over its source before it; with
    ``caption_target="random"`` a caption sample's target is one of its references, the same for the
    same (shard, key, epoch) and drawn again in a new epoch; ``canonical`` is always the first."""
    from vlmoe.tasks import training_target

    captions = [f"caption {i}" for i in range(5)]
    members = [m for i in range(4) for m in [(f"s{i}.png", png()), (f"s{i}.json", json.dumps({"captions": captions}))]]
    write_tar(tmp_path / "a.tar", members)
    stream = build_dataset(DataSource(str(tmp_path / "a.tar"), "caption"), train=True, batch_size=4, shuffle_buffer=1)
    batches = [b for b, _ in zip(stream, range(12))]
    samples = [s for b in batches for s in b.data]
    assert [s.epoch for s in samples] == [e for e in range(12) for _ in range(4)]
    by_epoch = [[training_target(s, "random") for s in samples[4 * e : 4 * e + 4]] for e in range(12)]
    assert all(t in captions for epoch in by_epoch for t in epoch)
    assert len({tuple(epoch) for epoch in by_epoch}) > 1  # new draws in new epochs
    again = [s for b, _ in zip(build_dataset(DataSource(str(tmp_path / "a.tar"), "caption"), train=True, batch_size=4,
                                             shuffle_buffer=1), range(12)) for s in b.data]
    assert [training_target(s, "random") for s in again] == [t for epoch in by_epoch for t in epoch]
    assert {training_target(s) for s in samples} == {"caption 0"}
