"""Sub-string matching of captions against MetaCLIP metadata entries, one shard at a time.

MetaCLIP's rule (``mode="metaclip"``, reproduced exactly): the caption gets a space at each end,
each of , . ; : ? ! ` gets a space on both sides, tab/newline/return become spaces, and an entry
matches when " " + entry + " " occurs in that text (case-sensitive).

Why a token trie instead of a character Aho-Corasick automaton: a match of " E " starts and ends on
a space, so E is exactly the text between two spaces of the spaced caption, i.e. a run of
consecutive tokens of ``spaced.split(" ")`` joined by single spaces (empty tokens included). So E
matches iff ``E.split(" ")`` occurs as a contiguous run of caption tokens. We map tokens to ids with
one hash lookup per distinct token and walk a trie over token ids for all start positions at once
with numpy (one ``searchsorted`` per phrase length). This is one multi-pattern automaton built once
per worker, gives the same matches as the reference automaton (tests check it against a brute
force), and runs over three times as fast (benchmarks/balance.py): no Python work per match.

``mode="normalized"`` tokenizes both sides the same way: Unicode NFKC, case-folded, words are runs
of letters/digits joined by inner hyphens or apostrophes, every other punctuation character is a
token of its own (so "(dog)" matches "dog" and "U.S." matches "u.s."), whitespace is only a
separator; ``plural_folding`` maps simple English plurals and possessives to the singular.
Entries that normalize to the same tokens all match together.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MatchMode = Literal["metaclip", "normalized"]
METACLIP_PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")
METACLIP_SPACED_CHARS = ("\t", "\n", "\r")
MATCHED_ENTRIES_TYPE = pa.list_(pa.int32())
CHUNK_ROWS = 16_384  # bounds the temporary token arrays for large inputs

_NORMALIZED_TOKEN = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")
# Apostrophe and hyphen look-alikes that NFKC leaves alone.
_UNIFY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2010": "-", "\u2011": "-"})
_NO_PLURAL_FOLD = ("ss", "us", "is")


def metaclip_spacing(text: str) -> str:
    """MetaCLIP's caption spacing (documentation and tests; ``Matcher`` does it on Arrow arrays)."""
    spaced = f" {text} "
    for punct in METACLIP_PUNCTUATION:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in METACLIP_SPACED_CHARS:
        spaced = spaced.replace(char, " ")
    return spaced


def fold_plural(token: str) -> str:
    """Map a plural or possessive English word to its singular ("dogs", "dog's", "boxes" -> ...).

    Rule-based and applied to entries and captions alike, so a wrong stem ("series" -> "sery")
    still matches itself; words ending in ss/us/is and words of 3 letters or fewer are kept."""
    if token.endswith("'s"):
        token = token[:-2]
    elif token.endswith("s'"):
        token = token[:-1]
    if len(token) <= 3 or not token.endswith("s") or token.endswith(_NO_PLURAL_FOLD):
        return token
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith(("ches", "shes", "sses", "xes", "zes")):
        return token[:-2]
    return token[:-1]


def normalized_tokens(text: str, plural_folding: bool = False) -> list[str]:
    tokens = _NORMALIZED_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold().translate(_UNIFY))
    return [fold_plural(t) for t in tokens] if plural_folding else tokens


class Matcher:
    """Matched entry ids for each caption; build once per worker (about 2 s and 100 MB for 500k entries)."""

    def __init__(self, entries: Sequence[str], mode: MatchMode = "metaclip", plural_folding: bool = False):
        if mode not in ("metaclip", "normalized"):
            raise ValueError(f"unknown matching mode {mode!r}; use 'metaclip' or 'normalized'")
        if plural_folding and mode != "normalized":
            raise ValueError("plural_folding needs mode 'normalized' (MetaCLIP's rule is exact)")
        self.mode = mode
        self.plural_folding = plural_folding
        self.n_entries = len(entries)
        self._build(entries)

    # ---- building -------------------------------------------------------------------------------

    def _entry_tokens(self, entry: str) -> list[str]:
        if self.mode == "metaclip":
            return entry.split(" ")
        return normalized_tokens(entry, self.plural_folding)

    def _build(self, entries: Sequence[str]) -> None:
        # States are entry prefixes: one-token prefixes are found by token id, longer ones by
        # (state, next token id). Built in one pass over the entries.
        vocab: dict[str, int] = {}
        single_state: dict[int, int] = {}  # token id -> state of the one-token prefix
        edges: dict[tuple[int, int], int] = {}
        state_group: list[int] = []  # per state: its entry group, -1 = not the end of an entry
        members: list[list[int]] = []
        for entry_id, entry in enumerate(entries):
            tokens = self._entry_tokens(entry)
            if not tokens:  # normalized entry with no tokens: can never match
                continue
            first = vocab.setdefault(tokens[0], len(vocab))
            state = single_state.get(first)
            if state is None:
                state = single_state[first] = len(state_group)
                state_group.append(-1)
            for tok in tokens[1:]:
                key = (state, vocab.setdefault(tok, len(vocab)))
                nxt = edges.get(key)
                if nxt is None:
                    nxt = edges[key] = len(state_group)
                    state_group.append(-1)
                state = nxt
            if state_group[state] < 0:
                state_group[state] = len(members)
                members.append([])
            group = members[state_group[state]]
            if self.mode == "metaclip":
                group[:] = [entry_id]  # the reference automaton keeps the last id of a repeated entry
            else:
                group.append(entry_id)
        n_vocab = max(len(vocab), 1)
        keys = np.fromiter((s * n_vocab + t for s, t in edges), dtype=np.int64, count=len(edges))
        order = np.argsort(keys)
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._token_state = np.full(n_vocab, -1, dtype=np.int64)
        self._token_state[np.fromiter(single_state.keys(), dtype=np.int64, count=len(single_state))] = (
            np.fromiter(single_state.values(), dtype=np.int64, count=len(single_state))
        )
        self._edge_keys = keys[order]
        self._edge_next = np.fromiter(edges.values(), dtype=np.int64, count=len(edges))[order]
        self._state_group = np.asarray(state_group, dtype=np.int64)
        self._has_child = np.zeros(len(state_group), dtype=bool)
        self._has_child[self._edge_keys // n_vocab] = True
        sizes = np.array([len(m) for m in members], dtype=np.int64)
        self._group_ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._group_members = np.array([e for m in members for e in m], dtype=np.int64)
        self._singleton_groups = bool((sizes == 1).all())

    # ---- matching -------------------------------------------------------------------------------

    def match(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.ListArray:
        """One list<int32> of distinct matched entry ids (ascending) per caption; null -> []."""
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        elif not isinstance(captions, pa.Array):
            captions = pa.array(captions, pa.string())
        if not (pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type)):
            captions = captions.cast(pa.string())  # e.g. dictionary-encoded captions from parquet
        if len(captions) <= CHUNK_ROWS:
            return self._match_chunk(captions)
        parts = [
            self._match_chunk(captions.slice(s, CHUNK_ROWS)) for s in range(0, len(captions), CHUNK_ROWS)
        ]
        return pa.concat_arrays(parts)

    def _match_chunk(self, captions: pa.Array) -> pa.ListArray:
        n_rows = len(captions)
        tokens, lengths = self._tokenize(captions)
        token_ids = self._token_ids(tokens)
        rows, groups = self._walk(token_ids, lengths)
        return self._to_lists(rows, groups, n_rows)

    def _tokenize(self, captions: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Flat token strings of all captions and the token count of each caption."""
        if self.mode == "metaclip":
            spaced = captions
            for punct in METACLIP_PUNCTUATION:
                spaced = pc.replace_substring(spaced, punct, f" {punct} ")
            for char in METACLIP_SPACED_CHARS:
                spaced = pc.replace_substring(spaced, char, " ")
            # split(" ") of the spaced text without its two outer spaces: the tokens between spaces.
            lists = pc.split_pattern(spaced, " ")
            lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
            return pc.list_flatten(lists), lengths.astype(np.int64)
        per_caption = [
            normalized_tokens(text, self.plural_folding) if text is not None else []
            for text in captions.to_pylist()
        ]
        lengths = np.fromiter((len(t) for t in per_caption), dtype=np.int64, count=len(per_caption))
        return pa.array([t for toks in per_caption for t in toks], pa.string()), lengths

    def _token_ids(self, tokens: pa.Array) -> np.ndarray:
        """Vocabulary id per token (-1 = in no entry): one dict lookup per distinct token."""
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.int64)
        encoded = pc.dictionary_encode(tokens)
        distinct = encoded.dictionary.to_pylist()
        ids = np.fromiter(
            map(self._vocab.get, distinct, [-1] * len(distinct)), dtype=np.int64, count=len(distinct)
        )
        return ids[encoded.indices.to_numpy(zero_copy_only=False)]

    def _walk(self, token_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, group) for every entry occurrence: all start positions advance one token per step."""
        n = len(token_ids)
        row_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        next_id = np.full(n, -1, dtype=np.int64)  # the id of the following token in the same caption
        if n > 1:
            next_id[:-1] = token_ids[1:]
        ends = np.cumsum(lengths)[lengths > 0] - 1
        next_id[ends] = -1
        end = np.flatnonzero(token_ids >= 0)
        state = self._token_state[token_ids[end]]
        end, state = end[state >= 0], state[state >= 0]  # tokens that start no entry
        hit_rows, hit_groups = [], []
        while len(end):
            group = self._state_group[state]
            found = group >= 0
            hit_rows.append(row_of[end[found]])
            hit_groups.append(group[found])
            following = next_id[end]
            alive = self._has_child[state] & (following >= 0)
            end, state, following = end[alive] + 1, state[alive], following[alive]
            key = state * self._n_vocab + following
            at = np.searchsorted(self._edge_keys, key)
            at[at == len(self._edge_keys)] = 0
            ok = self._edge_keys[at] == key
            end, state = end[ok], self._edge_next[at[ok]]
        if not hit_rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(hit_rows), np.concatenate(hit_groups)

    def _to_lists(self, rows: np.ndarray, groups: np.ndarray, n_rows: int) -> pa.ListArray:
        if self._singleton_groups:
            entries = self._group_members[groups]
        else:
            sizes = self._group_ptr[groups + 1] - self._group_ptr[groups]
            rows = np.repeat(rows, sizes)
            starts = np.repeat(self._group_ptr[groups], sizes)
            within = np.arange(len(starts)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            entries = self._group_members[starts + within]
        # One sort gives rows in order, entries ascending and duplicates adjacent. Keys come as
        # row-sorted runs (one per phrase length), which a stable (merge) sort handles fast.
        keys = np.sort(rows * max(self.n_entries, 1) + entries, kind="stable")
        if len(keys):
            keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
        key_rows = keys // max(self.n_entries, 1)
        offsets = np.zeros(n_rows + 1, dtype=np.int32)
        np.cumsum(np.bincount(key_rows, minlength=n_rows), out=offsets[1:])
        values = pa.array((keys % max(self.n_entries, 1)).astype(np.int32), pa.int32())
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
