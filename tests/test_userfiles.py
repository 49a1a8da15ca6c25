"""toolkit.userfiles: the one check for a user's file and the JSON shape helpers."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from toolkit import userfiles as uf
from toolkit.errors import UserError


@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "pipe.json"
    os.mkfifo(p)
    return p


def _in_thread(fn, *args):
    """Run fn in a thread and fail (instead of hanging the suite) if it blocks."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), f"{fn.__name__} blocked on a non-regular file"
    return out


@pytest.mark.parametrize("reader", [uf.read_bytes, uf.read_text, uf.load_json, uf.check_regular])
def test_a_fifo_is_refused_without_blocking(fifo, reader):
    out = _in_thread(reader, fifo, "Label file")
    assert isinstance(out.get("exc"), UserError), out
    assert "FIFO" in str(out["exc"]) and str(fifo) in str(out["exc"])


def test_read_under_resolves_and_checks_each_part_when_it_reads(tmp_path, fifo):
    """read_under (the workbench's images): the real path must stay inside the root, no part of it may be a link
    swapped in, and only a regular file is read, without blocking."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "sub" / "a.jpg").write_bytes(b"A")
    (root / "other" / "a.jpg").write_bytes(b"B")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(b"SECRET")
    assert uf.read_under(root, "sub/a.jpg", "Image") == b"A"
    for rel in ("../outside/a.jpg", str(outside / "a.jpg"), "sub/../../outside/a.jpg", "", ".", "sub"):
        with pytest.raises(UserError):
            uf.read_under(root, rel, "Image")
    (root / "sub").rename(root / "sub.old")
    (root / "sub").symlink_to(outside)  # a folder on the way swapped for a link out of the root
    with pytest.raises(UserError, match="not a file inside"):
        uf.read_under(root, "sub/a.jpg", "Image")
    (root / "sub").unlink()
    (root / "sub").symlink_to(root / "other")  # a link that stays inside: its real path is read
    assert uf.read_under(root, "sub/a.jpg", "Image") == b"B"
    (root / "sub").unlink()
    (root / "sub.old").rename(root / "sub")
    os.replace(fifo, root / "sub" / "a.jpg")
    out = _in_thread(uf.read_under, root, "sub/a.jpg", "Image")
    assert isinstance(out.get("exc"), UserError) and "FIFO" in str(out["exc"]), out
    (root / "sub" / "a.jpg").unlink()
    (root / "sub" / "a.jpg").write_bytes(b"x" * 11)
    with pytest.raises(UserError, match="more than the 10"):
        uf.read_under(root, "sub/a.jpg", "Image", limit=10)
    # The root is taken as it was resolved at the start: a link swapped in for it later is refused.
    (root).rename(tmp_path / "root.old")
    root.symlink_to(outside)
    with pytest.raises(UserError, match="not a real path now"):
        uf.read_under(root, "a.jpg", "Image")


def test_folders_sockets_devices_and_missing_files_are_named(tmp_path):
    sock_path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        cases = {tmp_path: "a folder", sock_path: "a socket", "/dev/null": "a device", tmp_path / "nope": "not found"}
        for path, words in cases.items():
            with pytest.raises(UserError, match=words):
                uf.read_bytes(path, "Input")
    finally:
        s.close()


def test_refuse_non_regular_allows_a_missing_output_but_not_a_fifo(tmp_path, fifo):
    uf.refuse_non_regular(tmp_path / "new.csv", "Output")
    with pytest.raises(UserError, match="FIFO"):
        uf.refuse_non_regular(fifo, "Output")


def test_size_limit_and_encoding_are_messages(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"abc\xffdef")
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 3"):
        uf.read_text(p, "Notes")
    with pytest.raises(UserError, match="more than the 4 "):
        uf.read_bytes(p, "Notes", limit=4)
    assert uf.read_bytes(p, "Notes", limit=7) == b"abc\xffdef"


@pytest.mark.parametrize(
    "text, words",
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ("[" * (uf.MAX_JSON_DEPTH + 1) + "]" * (uf.MAX_JSON_DEPTH + 1), "nested more than"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": Infinity}', "Infinity is not a JSON number"),
        ('{"a": 1', "not valid JSON"),
        (b'{"a": "\xff"}', "not UTF-8"),
    ],
)
def test_parse_json_refuses_what_it_cannot_read(text, words):
    with pytest.raises(UserError, match=words):
        uf.parse_json(text, "Body")


def test_parse_json_keeps_ordinary_documents():
    assert uf.parse_json(b'\xef\xbb\xbf{"a": [1, 2.5, "x"]}', "Body") == {"a": [1, 2.5, "x"]}
    deep = "[" * uf.MAX_JSON_DEPTH + "]" * uf.MAX_JSON_DEPTH
    assert uf.parse_json(deep, "Body") is not None


@pytest.mark.parametrize("value", [True, False, 31.7, 1.0, float("inf"), "3", None, [3], -1, 2**63])
def test_want_int_refuses_everything_but_an_in_range_integer(value):
    with pytest.raises(uf.JsonShapeError, match=r"^body\.sample_id must be"):
        uf.want_int(value, "body.sample_id")


def test_want_int_bool_str_list_accept_their_own_type():
    assert uf.want_int(31, "x") == 31
    assert uf.want_bool(False, "x") is False
    assert uf.want_str("héllo", "x") == "héllo"
    assert uf.want_str_list(["a", "b"], "x") == ["a", "b"]
    assert uf.want_dict({}, "x") == {}


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, []])
def test_want_bool_refuses_truthy_lookalikes(value):
    with pytest.raises(uf.JsonShapeError, match="must be true or false"):
        uf.want_bool(value, "body.clear")


def test_want_str_refuses_lone_surrogates_long_text_and_non_strings():
    with pytest.raises(uf.JsonShapeError, match="lone surrogate at character 2"):
        uf.want_str("ab\ud800", "body.notes")
    with pytest.raises(uf.JsonShapeError, match="at most 5"):
        uf.want_str("x" * 6, "body.notes", max_len=5)
    with pytest.raises(uf.JsonShapeError, match="must be a string; it is a list"):
        uf.want_str(["a"], "body.notes")


def test_a_bare_string_is_never_read_as_a_list_of_characters():
    with pytest.raises(uf.JsonShapeError, match=r"value\.text must be a list; it is a string"):
        uf.want_str_list("hello", "value.text")
