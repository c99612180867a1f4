"""url_blocklist: exact URLs, hosts with their subdomains, and registered domains, from txt/csv/parquet lists."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pairsift.stages import stage_class
from pairsift.stages.blocklist import UrlBlocklist, UrlBlocklistConfig, registered_domain, split_url

URLS = [
    "http://127.0.0.1:8765/img/1.jpg",          # 0 exact url (listed with upper-case host, :80 elsewhere)
    "HTTP://Bad.Example.com/a.png#frag",         # 1 host list: subdomain of example.com? no: bad.example.com
    "https://cdn.bad.example.com/x.jpg",         # 2 host list: subdomain of bad.example.com
    "https://good.example.com/x.jpg",            # 3 not listed (example.com itself is not on the host list)
    "https://a.shop.co.uk/1.jpg",                # 4 registered domain shop.co.uk
    "https://co.uk/1.jpg",                       # 5 a public suffix alone: not shop.co.uk
    "https://b.other.github.io/p.jpg",           # 6 registered domain other.github.io (private suffix github.io)
    "https://mine.github.io/p.jpg",              # 7 another github.io site: not blocked
    "not a url",                                 # 8 left for download to refuse
    None,                                        # 9
    "http://127.0.0.1/img/2.jpg",                # 10 exact url given with the default port in the list
]
EXPECTED = ["urls", "hosts", "hosts", None, "domains", None, "domains", None, None, None, "urls"]


@pytest.fixture()
def lists(tmp_path):
    (tmp_path / "urls.txt").write_text("# takedown requests\nhttp://127.0.0.1:8765/img/1.jpg\n\nhttp://127.0.0.1:80/img/2.jpg\n")
    pacsv.write_csv(pa.table({"note": ["x", "y"], "host": ["bad.example.com", "elsewhere.org"]}), tmp_path / "hosts.csv")
    pq.write_table(pa.table({"domain": ["shop.co.uk", "https://x.other.github.io/whatever"]}), tmp_path / "domains.parquet")
    return [
        {"name": "urls", "path": str(tmp_path / "urls.txt"), "kind": "url"},
        {"name": "hosts", "path": str(tmp_path / "hosts.csv"), "kind": "host", "column": "host"},
        {"name": "domains", "path": str(tmp_path / "domains.parquet"), "kind": "registered_domain"},
    ]


def test_each_kind_of_list_blocks_exactly_its_urls(lists):
    stage = stage_class("url_blocklist")(UrlBlocklistConfig(lists=lists))
    stage.setup()
    out = stage(pa.table({"uid": [f"{i:032x}" for i in range(len(URLS))], "url": pa.array(URLS, pa.string())}))
    assert out.column("blocklist").to_pylist() == EXPECTED
    assert out.column("reason").to_pylist() == ["blocklisted" if e else None for e in EXPECTED]
    assert out.column("uid").to_pylist() == [f"{i:032x}" for i in range(len(URLS))]  # rows kept, in order


def test_first_list_naming_an_entry_wins(tmp_path):
    (tmp_path / "a.txt").write_text("example.com\n")
    (tmp_path / "b.txt").write_text("example.com\n")
    stage = UrlBlocklist(UrlBlocklistConfig(lists=[
        {"name": "first", "path": str(tmp_path / "a.txt"), "kind": "host"},
        {"name": "second", "path": str(tmp_path / "b.txt"), "kind": "host"}]))
    stage.setup()
    assert stage.match("https://www.example.com/") == "first"


def test_a_missing_list_or_column_is_one_line(tmp_path):
    stage = UrlBlocklist(UrlBlocklistConfig(lists=[{"name": "gone", "path": str(tmp_path / "nope.txt"), "kind": "url"}]))
    with pytest.raises(ValueError, match="blocklist 'gone': cannot read"):
        stage.setup()
    pq.write_table(pa.table({"a": ["x"]}), tmp_path / "l.parquet")
    stage = UrlBlocklist(UrlBlocklistConfig(lists=[
        {"name": "l", "path": str(tmp_path / "l.parquet"), "kind": "host", "column": "domain"}]))
    with pytest.raises(ValueError, match="has no column 'domain'"):
        stage.setup()
    with pytest.raises(ValidationError):
        UrlBlocklistConfig(lists=[{"name": "x", "path": "p", "kind": "regex"}])


def test_url_normalisation_and_registered_domains():
    assert split_url("HTTPS://Example.COM:443/a?b=1#c") == ("https", "example.com", "https://example.com/a?b=1")
    assert split_url("http://[::1]:8080/x")[2] == "http://[::1]:8080/x"
    assert split_url("ftp://example.com/x") is None and split_url("http:///x") is None
    assert split_url("http://example.com:99999/") is None  # invalid port: not a URL
    assert registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert registered_domain("127.0.0.1") == "127.0.0.1"
    assert registered_domain("x.blogspot.com") == "x.blogspot.com"


def test_contract_says_what_it_reads_writes_and_drops(lists):
    contract = UrlBlocklist(UrlBlocklistConfig(lists=lists)).contract()
    assert contract.reads == ("url",) and set(contract.writes) == {"blocklist"}
    assert contract.reasons == ("blocklisted",)
