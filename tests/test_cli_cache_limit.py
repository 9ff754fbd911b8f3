"""The document cache's size limit from the command line (issue 27): --cache-max on the
commands that write the cache, the line each write is reported in, and cache list's totals."""

import json
import re

import cli_support
from cli_support import invoke, write

# the shared fixtures, by name (the autouse ones apply to this module too)
isolated_cache, load_each_model_once = cli_support.isolated_cache, cli_support.load_each_model_once
stories, story_text = cli_support.stories, cli_support.story_text

WROTE = re.compile(
    r"^cache: wrote ([\d.]+ [KMG]?B) for this document.* \(cache now ([\d.]+ [KMG]?B) of ([\d.]+ [KMG]?B)"
)


def ask(document, stories, *extra):
    return invoke("ask", document, "-q", "Who is Lily?", "-m", stories, "-n", "2", "--no-progress", *extra)


def wrote_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("cache: wrote")]


def test_each_write_says_its_size_and_the_total_against_the_limit(tmp_path, stories, story_text, isolated_cache):
    document = write(tmp_path, "a.txt", story_text[:1500])
    first = ask(document, stories, "--cache-max", "500M")
    assert first.exit_code == 0, first.stderr
    (line,) = wrote_lines(first)
    size, total, limit = WROTE.match(line).groups()
    assert size == total and limit == "500.0 MB"
    assert ask(document, stories, "--cache-max", "500M").stderr.count("cache: wrote") == 0  # a hit writes nothing
    assert wrote_lines(ask(write(tmp_path, "b.txt", story_text[:900]), stories, "--quiet")) == []


def test_cache_max_evicts_the_least_recently_used_entries(tmp_path, stories, story_text, isolated_cache):
    documents = [write(tmp_path, f"{n}.txt", story_text[n * 700 : n * 700 + 1400]) for n in range(3)]
    for document in documents[:2]:
        assert ask(document, stories).exit_code == 0
    sizes = sorted(path.stat().st_size for path in isolated_cache.glob("*.safetensors"))
    assert len(sizes) == 2
    third = ask(documents[2], stories, "--cache-max", str(int(sizes[-1] * 2.5)))  # room for two entries, not three
    (line,) = wrote_lines(third)
    assert "removed 1 least recently used entry" in line, line
    listed = invoke("cache", "list", "--json")
    names = [entry["documents"] for entry in json.loads(listed.stdout)["entries"]]
    assert len(names) == 2 and documents[0] not in names  # the oldest went, the newest stayed


def test_an_entry_larger_than_the_limit_is_kept_and_said_to_be(tmp_path, stories, story_text, isolated_cache):
    result = ask(write(tmp_path, "a.txt", story_text[:1500]), stories, "--cache-max", "1k")
    (line,) = wrote_lines(result)
    assert "the newest entry is kept even past the limit" in line
    assert len(list(isolated_cache.glob("*.safetensors"))) == 1


def test_chat_and_summarize_take_cache_max(tmp_path, stories, story_text, isolated_cache):
    document = write(tmp_path, "a.txt", story_text[:1200])
    chat = invoke("chat", document, "-m", stories, "-n", "2", "--cache-max", "2G", "--no-progress", input="Who?\n")
    assert chat.exit_code == 0, chat.stderr
    assert WROTE.match(wrote_lines(chat)[0]).group(3) == "2.0 GB"
    summary = invoke("summarize", write(tmp_path, "b.txt", story_text[1200:2400]), "-m", stories, "-n", "2")
    assert summary.exit_code == 0 and len(wrote_lines(summary)) == 1


def test_a_bad_cache_max_is_one_usage_line(tmp_path, stories):
    for bad in ("lots", "0", "-2G", "inf"):
        result = invoke("ask", "nothing.txt", "-q", "x", "--cache-max", bad)
        assert result.exit_code == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: Invalid value for '--cache-max':") and "is not a size" in line
        assert line.endswith("(see selfextend ask --help)")


def test_cache_list_shows_the_entries_the_total_and_the_limit(tmp_path, stories, story_text, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_CACHE_MAX", "3G")
    assert "(limit 3.0 GB)" in invoke("cache", "list").stdout
    ask(write(tmp_path, "a.txt", story_text[:1000]), stories)
    ask(write(tmp_path, "b.txt", story_text[1000:2000]), stories)
    record = json.loads(invoke("cache", "list", "--json").stdout)
    assert record["count"] == 2 and record["limit_bytes"] == 3_000_000_000
    assert record["total_bytes"] == sum(entry["bytes"] for entry in record["entries"])
    first = invoke("cache", "list").stdout.splitlines()[0]
    assert first.startswith("2 cached documents, ") and "(limit 3.0 GB)" in first
