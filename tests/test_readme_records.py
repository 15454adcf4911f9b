"""Every benchmark figure a README quotes comes from a record under bench/records/, or is marked as unrecorded.

The Markdown files checked (MARKDOWN_FILES: the READMEs and every docs/**/*.md page of the documentation site; the
site's benchmark pages are generated from the records by docs/gen_bench.py and are not files there) mark their benchmark figures with two kinds of region, each an HTML
comment alone on its line (invisible when rendered; indent it to the item's text inside a list, so the list stays
one list), closed by its own end marker:

    <!-- record: bench/records/PATH.json[, bench/records/OTHER.json] -->
    ... every figure here must be found in the named record file(s) ...
    <!-- /record -->

    <!-- unrecorded -->
    *Unrecorded: why (e.g. measured before bench/records existed); no record file backs these figures yet.*
    ... figures without a record ...
    <!-- /unrecorded -->

Figure tokens (found outside fenced code blocks, inline `code` spans and HTML comments):

- a decimal with 3 or more decimal places: 0.8203, +0.0248, 1.000000;
- scientific notation with a decimal point: 1.4e-7, 7.73e-5 (not a bare 2e-5, which is how settings are written);
- a ratio: x1.12, x4.14, 0.66x, 6x;
- a number followed by a unit (UNITS: texts/s, pairs/s, samples/s, queries/s, tokens/s, requests/s, ms/query, ms,
  s, seconds, min, minutes, h, hours, GB, MB, GiB, %), thousands separators included (2,234 texts/s); both ends of
  a range (79-81 s, 0.5-1 GiB) are figures.

The rule:

1. A figure token outside any region fails (file:line and the token are listed), so a new figure cannot be quoted
   without saying where it comes from. Settings are not figures: write them in a code span (`30 s`).
2. Inside a record region every figure token must match a number of the named records: all numeric leaves of the
   JSON plus the numbers written inside its strings (keys are not searched). A token matches a record value when
   the value, rounded to the token's printed decimal places, equals it (for scientific notation: to its printed
   mantissa digits); sign, thousands separators, the ratio's "x" and "%" are ignored. The one unit conversion:
   a figure in min / minutes also matches a record value in seconds / 60, in h / hours a value / 3600. (An integer
   matches any value that rounds to it, so a region should name small summary records, not per-query scores.)
3. Every record path must exist, be under bench/records/ and be JSON, and the record must carry its provenance
   (command, commit, date, cpu): in the record itself (bench/record.py's write_record) or, for records written
   before that helper, in a PROVENANCE.json in the record's folder or a folder above it inside bench/records/.
4. The first non-blank line of an unrecorded region is the visible note: it starts with "*Unrecorded:" (after an
   optional list marker), so a reader sees which figures have no record.
5. Regions do not nest; every region is closed; a closing marker must close the open region's kind.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKDOWN_FILES = ("README.md", "serve/README.md", "eval/README.md", "bench/README.md",
                  *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("**/*.md")))
RECORDS_DIR = "bench/records"
PROVENANCE_KEYS = ("command", "commit", "date", "cpu")

UNITS = ("texts/s", "pairs/s", "samples/s", "queries/s", "tokens/s", "requests/s", "ms/query", "ms", "seconds",
         "s", "minutes", "min", "hours", "h", "GB", "MB", "GiB", "%")
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_UNIT = "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))
TOKEN_RE = re.compile(
    r"(?P<sci>(?<![\w./])[+-]?\d+\.\d+e[+-]?\d+(?![\w.]))"
    r"|(?P<xpre>(?<![\w.])x(?P<xpre_n>\d+(?:\.\d+)?)(?![\w]|\.\d))"
    rf"|(?P<unit>(?<![\w.,])(?P<lo>{_NUM})(?:\s?[-\u2013]\s?(?P<hi>{_NUM}))?\s?(?P<u>{_UNIT})(?![\w/]))"
    rf"|(?P<xsuf>(?<![\w.,])(?P<xsuf_n>{_NUM})x(?!\w))"
    r"|(?P<dec>(?<![\w./])[+-]?\d+\.\d{3,}(?![\w]|\.\d))"
)
OPEN_RECORD = re.compile(r"^\s*<!--\s*record:\s*(?P<paths>.*?)\s*-->\s*$")
OPEN_UNRECORDED = re.compile(r"^\s*<!--\s*unrecorded\s*-->\s*$")
CLOSE = re.compile(r"^\s*<!--\s*/(?P<kind>record|unrecorded)\s*-->\s*$")
NOTE = re.compile(r"^\s*(?:[-+]\s+|\d+\.\s+)?\*Unrecorded:")
FENCE = re.compile(r"^\s*(```|~~~)")
NUMBER_IN_STRING = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


@dataclass(frozen=True)
class Figure:
    text: str      # as printed: "x1.12", "2,234 texts/s", "0.8203"
    number: str    # the number alone: "1.12", "2,234", "0.8203"
    unit: str = ""

    @property
    def value(self) -> float:
        return abs(float(self.number.replace(",", "")))

    def matches(self, v: float) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        v, t = abs(v), self.value
        candidates = [v]
        if self.unit in ("min", "minutes"):
            candidates.append(v / 60)
        elif self.unit in ("h", "hours"):
            candidates.append(v / 3600)
        if "e" in self.number.lower():
            digits = len(self.number.lower().split("e")[0].split(".")[1])
            return any(float(f"{c:.{digits}e}") == t for c in candidates)
        decimals = len(self.number.split(".")[1]) if "." in self.number else 0
        return any(abs(c - t) <= 0.5 * 10 ** -decimals + 1e-9 for c in candidates)


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def visible_text(text: str) -> list[str]:
    """The lines of `text` with fenced code blocks, inline code spans and HTML comments blanked (line and column
    positions kept), i.e. what figure tokens are searched in."""
    lines, out, fenced = text.split("\n"), [], False
    for line in lines:
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    joined = "\n".join(out)
    joined = re.sub(r"(`+)(?:(?!\n\s*\n).)+?(?<!`)\1(?!`)", _blank, joined, flags=re.S)  # code spans
    joined = re.sub(r"<!--.*?-->", _blank, joined, flags=re.S)
    return joined.split("\n")


def figure_tokens(line: str) -> list[Figure]:
    found = []
    for m in TOKEN_RE.finditer(line):
        if m.group("sci"):
            found.append(Figure(m.group("sci"), m.group("sci").lstrip("+-")))
        elif m.group("xpre"):
            found.append(Figure(m.group("xpre"), m.group("xpre_n")))
        elif m.group("unit"):
            unit = m.group("u")
            found.append(Figure(m.group("unit"), m.group("lo"), unit))
            if m.group("hi"):
                found.append(Figure(m.group("unit"), m.group("hi"), unit))
        elif m.group("xsuf"):
            found.append(Figure(m.group("xsuf"), m.group("xsuf_n")))
        else:
            found.append(Figure(m.group("dec"), m.group("dec").lstrip("+-")))
    return found


def record_numbers(record) -> list[float]:
    """Every numeric leaf of a JSON record, plus the numbers written inside its string leaves."""
    out: list[float] = []

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, bool) or o is None:
            return
        elif isinstance(o, (int, float)):
            out.append(float(o))
        elif isinstance(o, str):
            out.extend(float(n) for n in NUMBER_IN_STRING.findall(o))

    walk(record)
    return out


def record_problems(rel: str, repo: Path) -> tuple[list[str], list[float]]:
    """Problems with one record path (existence, place, JSON, provenance) and its numbers."""
    path = (repo / rel).resolve()
    records_root = (repo / RECORDS_DIR).resolve()
    if records_root not in path.parents:
        return [f"record {rel} is not under {RECORDS_DIR}/"], []
    if not path.is_file():
        return [f"record {rel} does not exist"], []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"record {rel} is not JSON ({e})"], []
    provenance = record if isinstance(record, dict) else {}
    missing = [k for k in PROVENANCE_KEYS if k not in provenance]
    if missing:
        folder = path.parent
        while True:
            prov = folder / "PROVENANCE.json"
            if prov.is_file():
                provenance = json.loads(prov.read_text(encoding="utf-8"))
                missing = [k for k in PROVENANCE_KEYS if k not in provenance]
                break
            if folder == records_root:
                break
            folder = folder.parent
    problems = [f"record {rel} lacks its provenance {missing} (write it with bench/record.py, or add a "
                f"PROVENANCE.json beside it)"] if missing else []
    return problems, record_numbers(record)


def check_markdown(text: str, name: str, repo: Path = REPO) -> list[str]:
    """Every problem of one Markdown text, as "name:line: message" strings (empty: it passes)."""
    problems: list[str] = []
    raw = text.split("\n")
    visible = visible_text(text)
    fenced_lines = set()
    fenced = False
    for i, line in enumerate(raw):
        if FENCE.match(line) or fenced:
            fenced_lines.add(i)
        if FENCE.match(line):
            fenced = not fenced
    region = None  # {"kind", "line", "numbers", "note_seen", "first_line_checked", "paths"}
    for i, line in enumerate(raw):
        where = f"{name}:{i + 1}"
        if i not in fenced_lines:
            opened = OPEN_RECORD.match(line) or OPEN_UNRECORDED.match(line)
            closed = CLOSE.match(line)
            if opened:
                if region is not None:
                    problems.append(f"{where}: a region opens inside the {region['kind']} region of line "
                                    f"{region['line']} (regions do not nest)")
                if OPEN_RECORD.match(line):
                    paths = [p.strip() for p in OPEN_RECORD.match(line).group("paths").split(",") if p.strip()]
                    numbers: list[float] = []
                    if not paths:
                        problems.append(f"{where}: a record region names no record file")
                    for rel in paths:
                        p, nums = record_problems(rel, repo)
                        problems.extend(f"{where}: {m}" for m in p)
                        numbers.extend(nums)
                    region = {"kind": "record", "line": i + 1, "numbers": numbers, "paths": paths}
                else:
                    region = {"kind": "unrecorded", "line": i + 1, "note": None}
                continue
            if closed:
                if region is None:
                    problems.append(f"{where}: <!-- /{closed.group('kind')} --> closes no region")
                elif closed.group("kind") != region["kind"]:
                    problems.append(f"{where}: <!-- /{closed.group('kind')} --> closes the {region['kind']} "
                                    f"region of line {region['line']}")
                elif region["kind"] == "unrecorded" and not region["note"]:
                    problems.append(f"{name}:{region['line']}: the unrecorded region does not start with the "
                                    f"visible note '*Unrecorded: ...*'")
                region = None
                continue
        if region is not None and region["kind"] == "unrecorded" and region["note"] is None and line.strip():
            region["note"] = bool(NOTE.match(line)) and i not in fenced_lines
        for fig in figure_tokens(visible[i]):
            if region is None:
                problems.append(f"{where}: figure '{fig.text}' is outside any record / unrecorded region")
            elif region["kind"] == "record" and not any(fig.matches(v) for v in region["numbers"]):
                problems.append(f"{where}: figure '{fig.text}' ({fig.number}) is in none of "
                                f"{', '.join(region['paths'])}")
    if region is not None:
        problems.append(f"{name}:{region['line']}: the {region['kind']} region is never closed")
    return problems


# ---------------------------------------------------------------- the checker on synthetic Markdown


def _write(repo: Path, rel: str, obj) -> None:
    p = repo / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))


PROV = {"command": "bench/x.py", "commit": "abc", "date": "2026-01-01T00:00:00Z", "cpu": {"model": "m", "flags": []}}


@pytest.fixture
def repo(tmp_path):
    _write(tmp_path, "bench/records/x.json", {**PROV, "values": {"ndcg": 0.80966, "train_s": [79.4, 1020.0],
                                                                  "ratio": 1.1234, "note": "rate 2234.4 texts/s"}})
    return tmp_path


def test_tokens_found_and_not_found():
    """The token rule itself: what counts as a figure, and what (settings, versions, code) does not."""
    def texts(s):
        return [f.number for f in figure_tokens(visible_text(s)[0])]

    assert texts("nDCG@10 0.8203 vs +0.0248, lr 7.73e-5, diff 1.4e-7") == ["0.8203", "0.0248", "7.73e-5", "1.4e-7"]
    assert texts("x1.12 / x4.14 and 0.66x, 3x as long") == ["1.12", "4.14", "0.66", "3"]
    assert texts("2,234 texts/s in 173 s, 79-81 s, 404 MB, 94%, 15.6 ms/query, 2.5 hours") == [
        "2,234", "173", "79", "81", "404", "94", "15.6", "2.5"]
    assert texts("lr 2e-5, 0.05 margin, infinity-emb 0.0.78, 5 seeds, 2 shuffles, p90 0.17, 1,406 pairs, "
                 "arxiv.org/abs/2405.17428") == []
    assert texts("`--read-timeout 30 s` and `0.8203` <!-- 0.1234 -->") == []
    assert visible_text("a\n```\n0.8203 173 s\n```\nb")[2] == ""


def test_figure_matches_record_value_at_printed_precision():
    """Rounding: the record's value rounded to the printed decimals; minutes and hours from seconds."""
    assert Figure("0.8097", "0.8097").matches(0.80966)
    assert not Figure("0.8098", "0.8098").matches(0.80966)
    assert Figure("+0.0248", "0.0248").matches(0.02484)
    assert Figure("17 min", "17", "min").matches(1020.0)
    assert Figure("1.4e-7", "1.4e-7").matches(1.43e-7) and not Figure("1.5e-7", "1.5e-7").matches(1.43e-7)
    assert not Figure("1", "1").matches(True)


def test_clean_markdown_passes(repo):
    """No drift: recorded figures inside a record region, others in a noted unrecorded region."""
    md = ("# T\n\n<!-- record: bench/records/x.json -->\nnDCG@10 0.8097 in 79-79 s, x1.12, 17 min, 2,234 texts/s\n"
          "<!-- /record -->\n\n<!-- unrecorded -->\n*Unrecorded: measured before bench/records existed.*\n\n"
          "| a | 0.9999 |\n<!-- /unrecorded -->\n\nA setting: `30 s`.\n")
    assert check_markdown(md, "R.md", repo) == []


def test_unmarked_figure_fails(repo):
    """Drift caught: a new benchmark figure quoted outside any region (no record, no unrecorded note)."""
    problems = check_markdown("Speed: 2,234 texts/s, x4.14 torch.\n", "R.md", repo)
    assert len(problems) == 2 and "R.md:1: figure '2,234 texts/s'" in problems[0] and "x4.14" in problems[1]


def test_figure_absent_from_its_record_fails(repo):
    """Drift caught: a figure inside a record region that the record does not hold (edited by hand, or the record
    was re-run and the README not updated)."""
    md = "<!-- record: bench/records/x.json -->\nnDCG@10 0.8097, then 0.8100\n<!-- /record -->\n"
    problems = check_markdown(md, "R.md", repo)
    assert problems == ["R.md:2: figure '0.8100' (0.8100) is in none of bench/records/x.json"]


def test_missing_record_file_fails(repo):
    """Drift caught: a region naming a record file that does not exist (renamed, never committed), or one that
    lies outside bench/records/."""
    md = "<!-- record: bench/records/gone.json, eval/baselines/minilm.json -->\n0.8097\n<!-- /record -->\n"
    problems = check_markdown(md, "R.md", repo)
    assert "R.md:1: record bench/records/gone.json does not exist" in problems
    assert "R.md:1: record eval/baselines/minilm.json is not under bench/records/" in problems


def test_record_without_provenance_fails(repo):
    """Drift caught: a record without command / commit / date / cpu (neither its own nor a PROVENANCE.json)."""
    _write(repo, "bench/records/old/y.json", {"values": {"a": 0.8097}})
    md = "<!-- record: bench/records/old/y.json -->\n0.8097\n<!-- /record -->\n"
    assert any("lacks its provenance" in p for p in check_markdown(md, "R.md", repo))
    _write(repo, "bench/records/old/PROVENANCE.json", PROV)
    assert check_markdown(md, "R.md", repo) == []


def test_unrecorded_region_without_visible_note_fails(repo):
    """Drift caught: an unrecorded region whose figures a reader would take for recorded ones (no visible note)."""
    md = "<!-- unrecorded -->\nSpeed 2,234 texts/s.\n*Unrecorded: too late.*\n<!-- /unrecorded -->\n"
    assert check_markdown(md, "R.md", repo) == [
        "R.md:1: the unrecorded region does not start with the visible note '*Unrecorded: ...*'"]
    ok = "<!-- unrecorded -->\n\n- *Unrecorded: measured before records.* Speed 2,234 texts/s.\n<!-- /unrecorded -->\n"
    assert check_markdown(ok, "R.md", repo) == []


def test_unclosed_or_mismatched_region_fails(repo):
    """Drift caught: a region left open (it would silently cover every later figure), a nested or mismatched one."""
    assert check_markdown("<!-- unrecorded -->\n*Unrecorded: x*\n0.1234\n", "R.md", repo) == [
        "R.md:1: the unrecorded region is never closed"]
    md = "<!-- record: bench/records/x.json -->\n<!-- unrecorded -->\n<!-- /record -->\n"
    problems = check_markdown(md, "R.md", repo)
    assert any("regions do not nest" in p for p in problems)
    assert check_markdown("<!-- /record -->\n", "R.md", repo) == ["R.md:1: <!-- /record --> closes no region"]


def test_markers_inside_code_blocks_are_text(repo):
    """A marker shown in a fenced code block (documentation) opens nothing."""
    md = "```\n<!-- unrecorded -->\n```\nNo figures here.\n"
    assert check_markdown(md, "R.md", repo) == []


@pytest.fixture(scope="module")
def record_module():
    from conftest import bench_module

    yield from bench_module("record")


def test_write_record_carries_its_provenance(record_module, tmp_path, repo):
    """bench/record.py writes what the checker asks of a record: command, commit, date, CPU (model + int8 flags)
    and the values, atomically (no temporary file left behind), and a record without a command is refused."""
    cpuinfo = "model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile sse\n"
    assert record_module.cpu_info(cpuinfo) == {"model": "Some CPU", "flags": ["avx2", "avx512f", "avx512_vnni",
                                                                              "amx_tile"]}
    out = repo / "bench/records/new/r.json"
    written = record_module.write_record(out, {"seeds": {"42": 0.81234}}, command="bench/x.py --seeds 42")
    on_disk = json.loads(out.read_text())
    assert on_disk == written and on_disk["command"] == "bench/x.py --seeds 42"
    assert set(PROVENANCE_KEYS) <= set(on_disk) and on_disk["commit"] and on_disk["date"].endswith("Z")
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
    md = "<!-- record: bench/records/new/r.json -->\nseed 42: 0.8123\n<!-- /record -->\n"
    assert check_markdown(md, "R.md", repo) == []
    with pytest.raises(ValueError):
        record_module.write_record(out, {}, command="")


# ---------------------------------------------------------------- the real READMEs


def test_docs_pages_are_checked():
    """The glob found the documentation pages (a moved docs/ folder would otherwise leave them unchecked)."""
    assert {"docs/index.md", "docs/tune.md", "docs/quickstart.md"} <= set(MARKDOWN_FILES)


@pytest.mark.parametrize("name", MARKDOWN_FILES)
def test_readme_figures_have_records(name):
    """The READMEs as committed: every benchmark figure is in a record region whose record holds it, or in an
    unrecorded region that says so."""
    path = REPO / name
    problems = check_markdown(path.read_text(encoding="utf-8"), name)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)
