"""Global prefix tree and plan, against naive set-of-tuples references (hypothesis, tiny alphabets)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.prefix_tree.plan import DEFAULT_MIN_SAVING_TOKENS, make_plan, plan_tree
from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans
from batchllm.prefix_tree.tree import PrefixTree
from batchllm.prefix_tree.whole_rows import whole_rows

Rows = list[list[int]]
TOKEN = st.integers(0, 2)
SHORT_ROWS = st.lists(st.lists(TOKEN, min_size=1, max_size=10), max_size=30)


@st.composite
def pieced_rows(draw) -> Rows:
    """Rows glued from a few long pieces: shared runs longer than one comparison window."""
    pool = draw(st.lists(st.lists(TOKEN, min_size=1, max_size=40), min_size=1, max_size=5))
    pool[0] = pool[0] * (1 + 40 // len(pool[0]))  # at least one run past the comparison window
    picks = st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=4)
    return [sum((pool[i] for i in pick), []) for pick in draw(st.lists(picks, min_size=1, max_size=25))]


ROWS = st.one_of(SHORT_ROWS, pieced_rows())
PLAN_OPTIONS = st.fixed_dictionaries(
    {
        "min_saving_tokens": st.sampled_from([0, 3, DEFAULT_MIN_SAVING_TOKENS]),
        "dedup": st.booleans(),
    }
)


def build(rows: Rows) -> tuple[TokenSeqs, PrefixTree]:
    seqs = TokenSeqs.from_lists(rows)
    tree = PrefixTree.build(seqs)
    tree.check_invariants()
    return seqs, tree


def distinct_prefixes(rows: Rows) -> set[tuple[int, ...]]:
    return {tuple(r[:k]) for r in rows for k in range(1, len(r) + 1)}


def first_equal(rows: Rows) -> list[int]:
    first: dict[tuple[int, ...], int] = {}
    return [first.setdefault(tuple(r), i) for i, r in enumerate(rows)]


def naive_groups(rows: Rows, min_saving: int, dedup: bool) -> set[tuple[int, ...]]:
    """The selection rule of plan.py written plainly over a set of tuples: the tree holds every row less
    its last token (its tail), and rows count at the node where that key ends."""
    keys = [tuple(r[:-1]) for r in rows]
    ending: dict[tuple[int, ...], int] = {}
    seen: set[tuple[int, ...]] = set()
    for r, key in zip(rows, keys):
        if not (dedup and tuple(r) in seen):
            ending[key] = ending.get(key, 0) + 1
        seen.add(tuple(r))
    nexts: dict[tuple[int, ...], set[int]] = {}
    for key in keys:
        for k in range(len(key)):
            nexts.setdefault(key[:k], set()).add(key[k])
    nodes = {p for p, s in nexts.items() if len(s) > 1} | set(ending) | {()}
    parent = {v: next(v[:k] for k in range(len(v) - 1, -1, -1) if v[:k] in nodes) for v in nodes if v}
    units = dict.fromkeys(nodes, 0)
    chosen: set[tuple[int, ...]] = set()
    for v in sorted(nodes - {()}, key=len, reverse=True):
        units[v] += ending.get(v, 0)
        if (units[v] - 1) * (len(v) - len(parent[v])) > min_saving:
            chosen.add(v)
        units[parent[v]] += 1 if v in chosen else units[v]
    return chosen


def plan_of(rows: Rows, **options):
    """The plan through plan_tree, on a checked tree over the rows less their last token."""
    seqs = TokenSeqs.from_lists(rows)
    tree = PrefixTree.build(seqs.without_tails(np.ones(len(rows), dtype=np.int64)))
    tree.check_invariants()
    return seqs, plan_tree(tree, seqs, **options)


def node_prefix(seqs: TokenSeqs, plan, i: int) -> tuple[int, ...]:
    length = int(plan.node_length[i])
    if length == 0:  # the root; with no rows at all its source_row names no row
        return ()
    return tuple(seqs.row(int(plan.node_source_row[i]))[:length].tolist())


def parent_of(node_parent, node: int) -> int | None:
    up = int(node_parent[node])
    return None if up < 0 else up


def tree_prefix(tree, node: int) -> list[int]:
    return tree.seqs.row(int(tree.node_row[node]))[: int(tree.node_length[node])].tolist()


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_tree_holds_every_prompt_in_lexicographic_order(rows: Rows) -> None:
    seqs, tree = build(rows)
    assert [rows[i] for i in tree.order] == sorted(rows)
    assert tree.unique_prompt_tokens == len(distinct_prefixes(rows))
    assert tree.duplicate_of().tolist() == first_equal(rows)
    for r, row in enumerate(rows):
        node = int(tree.row_leaf[r])
        assert tree_prefix(tree, node) == row
        while (up := parent_of(tree.node_parent, node)) is not None:
            assert tree_prefix(tree, up) == row[: int(tree.node_length[up])]
            assert tree.node_length[up] < tree.node_length[node]
            node = up
        assert node == 0


@settings(max_examples=300, deadline=None)
@given(ROWS, PLAN_OPTIONS)
def test_plan_groups_nest_and_rows_run_depth_first(rows: Rows, options: dict) -> None:
    seqs, plan = plan_of(rows, **options)
    plan.check_invariants()
    assert plan.stats.unique_prompt_tokens == len(distinct_prefixes(rows))
    prefixes = [node_prefix(seqs, plan, i) for i in range(plan.num_nodes)]
    assert set(prefixes[1:]) == naive_groups(rows, options["min_saving_tokens"], options["dedup"])
    assert len(set(prefixes)) == plan.num_nodes
    for i in range(1, plan.num_nodes):
        parent = parent_of(plan.node_parent, i)
        assert parent is not None and parent < i
        assert prefixes[i][: len(prefixes[parent])] == prefixes[parent]
        assert len(prefixes[parent]) < len(prefixes[i])
    for r, row in enumerate(rows):
        fits = [p for p in prefixes if len(p) < len(row) and tuple(row[: len(p)]) == p]
        assert prefixes[plan.row_node[r]] == max(fits, key=len)  # the deepest strictly shorter group
    dup = first_equal(rows) if options["dedup"] else list(range(len(rows)))
    assert plan.duplicate_of.tolist() == dup
    reps = [r for r in range(len(rows)) if dup[r] == r]
    assert sorted(plan.row_order.tolist()) == reps
    check_groups_contiguous(plan)
    stats = plan.stats
    assert stats.unique_prompt_tokens <= stats.prefill_tokens_planned <= stats.prompt_tokens
    assert stats.duplicate_rows == len(rows) - len(reps)
    assert stats.groups == plan.num_nodes - 1


def check_groups_contiguous(plan) -> None:
    """Each node's rows (attached at or beneath it) are one run of row_order, num_rows long."""
    at: dict[int, list[int]] = {}
    for pos, r in enumerate(plan.row_order.tolist()):
        node: int | None = int(plan.row_node[r])
        while node is not None:
            at.setdefault(node, []).append(pos)
            node = parent_of(plan.node_parent, node)
    for i in range(plan.num_nodes):
        positions = at.get(i, [])
        assert len(positions) == plan.node_num_rows[i]
        if positions:
            assert positions[-1] - positions[0] + 1 == len(positions)


@settings(max_examples=100, deadline=None)
@given(ROWS)
def test_without_sharing_every_row_computes_its_whole_prompt(rows: Rows) -> None:
    _, plan = plan_of(rows, sharing=False, dedup=False)
    plan.check_invariants()
    assert plan.num_nodes == 1 and not plan.row_node.any()
    assert plan.stats.prefill_tokens_planned == plan.stats.prompt_tokens == sum(map(len, rows))
    _, deduped = plan_of(rows, sharing=False)
    deduped.check_invariants()
    assert deduped.stats.prefill_tokens_planned == sum(len(r) for r in {tuple(r) for r in rows})


@settings(max_examples=100, deadline=None)
@given(ROWS)
def test_zero_threshold_plans_exactly_the_unique_tokens_when_no_prompt_prefixes_another(rows: Rows) -> None:
    unique = {tuple(r) for r in rows}
    prefix_of_other = any(a != b and b[: len(a)] == a for a in unique for b in unique)
    plan = make_plan(TokenSeqs.from_lists(rows), min_saving_tokens=0)
    plan.check_invariants()
    if not prefix_of_other:
        assert plan.stats.prefill_tokens_planned == plan.stats.unique_prompt_tokens


@st.composite
def nested_prompts(draw) -> Rows:
    """Shared instruction + group text + row text, shuffled; content random, sizes from hypothesis."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vocab = draw(st.sampled_from([50, 1000]))  # 3 tokens: rows share ~2 by accident
    text = lambda lo, hi: rng.integers(0, vocab, int(rng.integers(lo, hi))).tolist()  # noqa: E731
    instruction = text(40, 80)
    rows = []
    for _ in range(draw(st.integers(2, 6))):
        group = text(40, 60)
        rows += [instruction + group + text(10, 30) for _ in range(draw(st.integers(2, 8)))]
    rows += [list(rows[i]) for i in rng.integers(0, len(rows), draw(st.integers(0, 3)))]
    return [rows[i] for i in rng.permutation(len(rows))]


@settings(max_examples=100, deadline=None)
@given(nested_prompts())
def test_nested_sharing_plans_close_to_the_unique_tokens(rows: Rows) -> None:
    plan = make_plan(TokenSeqs.from_lists(rows))
    plan.check_invariants()
    assert plan.stats.prefill_tokens_planned <= 1.05 * plan.stats.unique_prompt_tokens
    assert plan.stats.max_tree_depth >= 2


def test_system_prompt_and_product_groups_are_both_chosen() -> None:
    rng = np.random.default_rng(0)
    system = rng.integers(0, 1000, 150).tolist()
    products = [rng.integers(0, 1000, 80).tolist() for _ in range(3)]
    rows = [system + p + rng.integers(0, 1000, 20).tolist() for p in products for _ in range(20)]
    plan = make_plan(TokenSeqs.from_lists(rows))
    plan.check_invariants()
    assert plan.node_length.tolist() == [0, 150, 230, 230, 230]
    assert plan.node_num_rows.tolist() == [60, 60, 20, 20, 20]
    assert plan.stats.max_tree_depth == 2 and plan.stats.avg_sharing_degree == 20 + 40 / 4


def test_tiny_accidental_sharing_makes_no_group() -> None:
    rows = [[7, 8, 9, 1, 2], [7, 8, 9, 3, 4], list(range(40)) + [1], list(range(40)) + [2]]
    plan = make_plan(TokenSeqs.from_lists(rows))
    plan.check_invariants()
    assert list(zip(plan.node_length.tolist(), plan.node_num_rows.tolist())) == [(0, 4), (40, 2)]
    assert plan.row_node.tolist() == [0, 0, 1, 1]


def test_length_one_rows_duplicates_and_a_prompt_that_prefixes_others() -> None:
    rows = [[1], [1], [2], [1, 2], [1, 2, 3]]
    for sharing in (True, False):
        plan = make_plan(TokenSeqs.from_lists(rows), sharing=sharing, min_saving_tokens=0)
        plan.check_invariants()
        assert plan.duplicate_of.tolist() == [0, 0, 2, 3, 4]
        assert plan.stats.duplicate_rows == 1
        assert all(plan.node_length[plan.row_node] < [len(r) for r in rows])


def test_no_rows_gives_a_root_only_plan() -> None:
    plan = make_plan(TokenSeqs.from_lists([]))
    plan.check_invariants()
    assert plan.num_nodes == 1 and plan.stats.rows == 0 and plan.stats.saving_ratio == 0.0


def test_bad_input_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="tail"):
        make_plan(TokenSeqs.from_lists([[1], []]))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        TokenSeqs.from_lists([[1, -1]])
    with pytest.raises(ValueError, match="offsets"):
        TokenSeqs(np.array([1, 2], np.int32), np.array([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        TokenSeqs.from_lists([np.array([1.5])])
    with pytest.raises(ValueError, match="integers"):
        TokenSeqs.from_lists([[1, None]])
    with pytest.raises(ValueError, match="min_saving_tokens"):
        make_plan(TokenSeqs.from_lists([[1]]), min_saving_tokens=-1)


def test_many_rows_with_long_shared_runs_match_a_plain_sort() -> None:
    rng = np.random.default_rng(1)
    heads = rng.integers(0, 4, (6, 90))
    rows = [heads[i % 6][: 40 + i % 50].tolist() + rng.integers(0, 3, i % 7).tolist() for i in range(3000)]
    seqs, tree = build(rows)
    assert [rows[i] for i in tree.order] == sorted(rows)
    assert tree.unique_prompt_tokens == len(distinct_prefixes(rows))
    make_plan(seqs).check_invariants()


def test_identical_prompts_under_sampling_share_all_but_their_last_token() -> None:
    prompt = np.random.default_rng(3).integers(0, 1000, 200)
    plan = make_plan(TokenSeqs.from_lists([prompt] * 8), dedup=False)
    plan.check_invariants()
    assert plan.stats.groups == 1 and plan.node_length.tolist() == [0, 199]
    assert plan.stats.prefill_tokens_planned == 199 + 8  # vs 1,600 when each row computes its prompt
    assert plan.stats.prefill_tokens_planned <= 1.05 * plan.stats.unique_prompt_tokens


def test_rows_with_longer_tails_attach_above_them() -> None:
    """Scoring prompt + choice: each row computes the prompt's last token and its choice itself."""
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, 1000, 100).tolist()
    choices = [[5], [6, 7, 8], [6, 9]]
    rows = [prompt + c for c in choices]
    tails = np.array([len(c) + 1 for c in choices])
    plan = make_plan(TokenSeqs.from_lists(rows), tails=tails)
    plan.check_invariants()
    assert plan.node_length.tolist() == [0, 99] and plan.row_node.tolist() == [1, 1, 1]
    assert plan.stats.prefill_tokens_planned == 99 + sum(tails)


@st.composite
def rows_and_tails(draw) -> tuple[Rows, list[int] | None]:
    """Rows with exact copies and prefixes of other rows mixed in, shuffled; tails of one token
    (None: make_plan's default) or of 1..len(row) tokens (a scoring job's continuations; equal rows
    get equal tails, else merging duplicates could not keep each one's tail to itself)."""
    rows = draw(ROWS)
    if rows:
        picks = st.lists(st.integers(0, len(rows) - 1), max_size=8)
        rows += [list(rows[i]) for i in draw(picks)]
        rows += [rows[i][: draw(st.integers(1, len(rows[i])))] for i in draw(picks)]
        rows = draw(st.permutations(rows))
    if draw(st.booleans()):
        return rows, None
    tail = {tuple(r): draw(st.integers(1, len(r))) for r in rows}
    return rows, [tail[tuple(r)] for r in rows]


def tails_of(rows: Rows, tails: list[int] | None) -> np.ndarray:
    return np.array([1] * len(rows) if tails is None else tails, dtype=np.int64).reshape(-1)


TREE_ARRAYS = ("order", "node_length", "node_parent", "node_level", "node_lo", "node_hi", "row_leaf")
PLAN_ARRAYS = ("node_length", "node_parent", "node_source_row", "node_num_rows", "row_order", "row_node")


@settings(max_examples=100, deadline=None)
@given(rows_and_tails(), PLAN_OPTIONS)
def test_plan_equals_the_reference_planner_over_copied_rows_and_a_second_tree(case, options: dict) -> None:
    """make_plan builds over spans of the rows' own buffer and, with one-token tails, takes duplicates
    and distinct prefixes from that tree; the reference planner (the one before) built over a copy of
    the rows less their tails and took them from a second tree over the whole rows. Same inputs to
    the unchanged selection, same plan."""
    rows, tails = case
    seqs, tail = TokenSeqs.from_lists(rows), tails_of(rows, tails)
    spans = seqs.heads(tail)
    assert spans.tokens is seqs.tokens  # no token copied
    for r in range(len(rows)):
        assert spans.row(r).tolist() == rows[r][: len(rows[r]) - tail[r]]
    tree, copied, full = PrefixTree.build(spans), PrefixTree.build(seqs.without_tails(tail)), build(rows)[1]
    tree.check_invariants()
    for name in TREE_ARRAYS:
        assert np.array_equal(getattr(tree, name), getattr(copied, name)), name
    whole = whole_rows(tree, seqs)
    assert whole.duplicate_of.tolist() == full.duplicate_of().tolist() == first_equal(rows)
    assert whole.unique_prompt_tokens == full.unique_prompt_tokens == len(distinct_prefixes(rows))
    plan = make_plan(seqs, tails=None if tails is None else tail, **options)
    plan.check_invariants()
    reference = plan_tree(copied, seqs, **options)
    for name in PLAN_ARRAYS:
        assert np.array_equal(getattr(plan, name), getattr(reference, name)), name
    assert plan.duplicate_of.tolist() == (first_equal(rows) if options["dedup"] else list(range(len(rows))))
    assert plan.stats == reference.stats


@pytest.mark.parametrize(
    "rows", [[], [[5]], [[5], [5]], [[5], [5, 6]], [[5, 6], [5]], [[5, 6], [5, 7], [5, 6]], [[1, 2, 3]]]
)
def test_whole_rows_of_the_smallest_inputs(rows: Rows) -> None:
    seqs = TokenSeqs.from_lists(rows)
    whole = whole_rows(PrefixTree.build(seqs.heads(np.ones(len(rows), dtype=np.int64))), seqs)
    assert whole.duplicate_of.tolist() == first_equal(rows)
    assert whole.unique_prompt_tokens == len(distinct_prefixes(rows))
    plan = make_plan(seqs, min_saving_tokens=0)
    plan.check_invariants()
    assert plan.stats.rows == len(rows) and plan.stats.unique_prompt_tokens == len(distinct_prefixes(rows))


def test_spans_outside_their_buffer_are_refused() -> None:
    tokens = np.arange(4, dtype=np.int32)
    with pytest.raises(ValueError, match="inside"):
        TokenSpans(tokens, np.array([0, 3]), np.array([2, 2]))
    with pytest.raises(ValueError, match="contiguous buffer of int32"):
        TokenSpans(tokens.astype(np.int64), np.array([0]), np.array([2]))
    with pytest.raises(ValueError, match="contiguous buffer of int32"):
        TokenSpans(tokens[::2], np.array([0]), np.array([2]))
    with pytest.raises(ValueError, match="tail"):
        TokenSeqs.from_lists([[1, 2]]).heads(np.array([3]))
