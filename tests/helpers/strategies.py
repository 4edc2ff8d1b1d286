"""Hypothesis strategies that draw plan texts (valid syntax, random content)."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.helpers.plans import MOE_HEADER, SMOL_HEADER

ints = st.integers(min_value=0, max_value=40)


@st.composite
def selections(draw: st.DrawFn, hi: int = 40) -> str:
    items = []
    for _ in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, hi))
        if draw(st.booleans()):
            b = draw(st.integers(0, hi))
            items.append(f"{a}..{b}")
        else:
            items.append(str(a))
    sep = draw(st.sampled_from([", ", ",", " , "]))
    return sep.join(items)


metric = st.sampled_from(["", " by magnitude", " by taylor", " by wanda"])
comment = st.sampled_from(["", "  # score 0.12", "\t# why: angular distance"])


@st.composite
def statements(draw: st.DrawFn) -> str:
    sel = draw(selections())
    kind = draw(st.integers(0, 8))
    body = [
        f"drop layers {sel}",
        f"keep layers {sel}",
        f"bundle {draw(st.sampled_from(['B', 'C', 'D']))} layers {sel}",
        f"attn layers {sel} drop groups {draw(selections(hi=4))}"
        + draw(st.sampled_from(["", " compensate", " reconstruct", " compensate reconstruct"])),
        f"mlp layers {sel} width {draw(st.integers(0, 2000))}{draw(metric)}"
        + draw(st.sampled_from(["", " compensate", " reconstruct", " compensate reconstruct"])),
        f"moe layers {sel} drop experts {draw(selections(hi=20))}",
        f"moe layers {sel} experts width {draw(st.integers(0, 200))}{draw(metric)}",
        f"moe layers {sel} shared width {draw(st.integers(0, 300))}{draw(metric)}",
        f"# a note about layer {draw(ints)}",
    ][kind]
    return body + draw(comment)


@st.composite
def plans(draw: st.DrawFn) -> str:
    header = draw(st.sampled_from([SMOL_HEADER, MOE_HEADER]))
    lead = draw(st.sampled_from(["", "# made by plangen 0.1\n", "\n\n"]))
    extra = draw(
        st.lists(
            st.sampled_from(
                [
                    'source "models/x y"',
                    'scores "s.safetensors" sha256 "ab\\"c"',
                    "calibration builtin samples 32 seqlen 512 seed 0",
                ]
            ),
            unique=True,
        )
    )
    body = draw(st.lists(statements(), max_size=10))
    blank = draw(st.sampled_from(["\n", "\n\n"]))
    return lead + header + "\n".join(extra) + "\n" + blank.join(body) + "\n"
