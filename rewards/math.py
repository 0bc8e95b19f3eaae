"""Math answer reward: extract the final answer, normalise it, compare it with the reference.

Pipeline for each response:
1. extract: the last `\\boxed{...}`, else GSM8K's `#### 72`, else "the answer is ...", else the
   last number in the text (each step can be switched off with `extractors=`);
2. normalise both strings: math delimiters, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, `\\frac12`,
   `\\sqrt2`, `^\\circ`, `\\%`, `$`, thousands separators, trailing `.0`, `\\text{...}` and
   plain-text units ("72 dollars"), a leading `x =`;
3. compare: equal strings; else equal numbers within tolerance (a small LaTeX -> arithmetic
   evaluator: fractions, roots, powers, pi, no sympy needed); else element-wise for tuples and
   intervals; else, when sympy is installed, `simplify(a - b) == 0` on short expressions.

Model output is untrusted: nothing here calls `eval`; the arithmetic evaluator walks an AST
allow-list, and text reaches sympy only after a character and identifier allow-list.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, Sequence

from rewards.base import register_reward

DEFAULT_EXTRACTORS = ("boxed", "gsm8k", "answer_is", "last_number")

# ---------------------------------------------------------------------------------------------
# 1. Extraction
# ---------------------------------------------------------------------------------------------

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(rf"(?:{_NUMBER})(?:\s*/\s*\d+(?![\d.]))?")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; `\\boxed 5` too."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # `\boxed 5`: up to the next space or `$`
        return re.split(r"[\s$]", text[i + 1 :], maxsplit=1)[0] or None
    if i >= len(text) or text[i] != "{":
        return None
    group = _brace_group(text, i)
    return group[0] if group else None


def extract_gsm8k(text: str) -> str | None:
    """What follows the last `####` on its line (GSM8K's reference format)."""
    matches = _GSM8K_RE.findall(text)
    if not matches:
        return None
    return matches[-1].strip() or None


def extract_answer_is(text: str) -> str | None:
    """The phrase after the last "answer is" / "answer:", up to the end of its sentence."""
    matches = _ANSWER_IS_RE.findall(text)
    if not matches:
        return None
    phrase = _SENTENCE_END_RE.split(matches[-1], maxsplit=1)[0]
    return phrase.strip().rstrip(".,;:!") or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text ("1,200", "-3.5", "3/4")."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


EXTRACTORS = {
    "boxed": extract_boxed,
    "gsm8k": extract_gsm8k,
    "answer_is": extract_answer_is,
    "last_number": extract_last_number,
}


def extract_answer(text: str, extractors: Sequence[str] = DEFAULT_EXTRACTORS) -> str | None:
    """The first answer found by `extractors`, tried in order; None when none finds one."""
    for name in extractors:
        answer = EXTRACTORS[name](text)
        if answer:
            return answer
    return None


# ---------------------------------------------------------------------------------------------
# 2. Normalisation
# ---------------------------------------------------------------------------------------------

_DROP = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\displaystyle", "\\$", "$", r"\%", "%"]
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}(\^\{?\d\}?)?")
_UNIT_WORDS_RE = re.compile(r"\s*[a-zA-Z][a-zA-Z\s.']*")
_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_ASSIGN_RE = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")
# "72 dollars", "5 cm", "about 3 hours": words around one plain number
_UNITS_RE = re.compile(rf"^(?:[a-zA-Z']+\s+)*?({_NUMBER})(?:\s+[a-zA-Z][a-zA-Z'.]*(?:\^\{{?\d\}}?)?)+$")


def _strip_text(s: str) -> str:
    """Drop a trailing `\\text{ cm}^2`-style unit after a value; unwrap any other `\\text{...}`."""
    end = len(s.rstrip())

    def replace(m: re.Match) -> str:
        unit = m.end() == end and m.start() > 0 and _UNIT_WORDS_RE.fullmatch(m.group(1))
        return "" if unit else f" {m.group(1)} {m.group(2) or ''}"

    return _TEXT_RE.sub(replace, s)


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer (whitespace removed)."""
    s = str(answer).strip().replace("\u2212", "-")  # unicode minus
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", "")
    s = _DEGREES_RE.sub("", s)
    s = _strip_text(s)
    for token in _DROP:
        s = s.replace(token, "")
    s = s.replace("\\ ", " ").replace("~", " ").strip().rstrip(".").strip()
    s = _ASSIGN_RE.sub("", s)
    if not re.search(r"[()\[\]{}]", s):  # in a tuple "(1,234)" a comma separates elements
        s = _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), s)
    units = _UNITS_RE.match(s)
    if units:
        s = units.group(1)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"(?<!\d)(\d+\.\d*?)0+(?!\d)", r"\1", s)  # 2.50 -> 2.5, 2.0 -> 2.
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)  # 2. -> 2
    return s


# ---------------------------------------------------------------------------------------------
# 3. Comparison
# ---------------------------------------------------------------------------------------------


def _brace_group(s: str, i: int) -> tuple[str, int] | None:
    """For s[i] == "{", return (content, index after the matching "}"), or None if unbalanced."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1 : j], j + 1
    return None


def _latex_arg(s: str, i: int) -> tuple[str, int] | None:
    """One argument of a LaTeX command at s[i]: a brace group or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        return _brace_group(s, i)
    return s[i], i + 1


def latex_to_expr(s: str) -> str | None:
    """Turn normalised LaTeX into a plain infix expression ("\\frac{1}{2}" -> "((1)/(2))")."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num = _latex_arg(s, i + 5)
            den = num and _latex_arg(s, num[1])
            if not den:
                return None
            a, b = latex_to_expr(num[0]), latex_to_expr(den[0])
            if a is None or b is None:
                return None
            out.append(f"(({a})/({b}))")
            i = den[1]
        elif s.startswith("\\sqrt", i):
            j, index = i + 5, None
            if j < len(s) and s[j] == "[":  # \sqrt[3]{x}
                close = s.find("]", j)
                if close < 0:
                    return None
                index, j = latex_to_expr(s[j + 1 : close]), close + 1
            arg = _latex_arg(s, j)
            inner = arg and latex_to_expr(arg[0])
            if not inner:
                return None
            out.append(f"(({inner})**(1/({index})))" if index else f"sqrt({inner})")
            i = arg[1]
        elif s[i] == "\\":
            name = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not name:
                return None
            word = {"cdot": "*", "times": "*", "div": "/", "pi": "pi"}.get(name.group(1))
            if word is None:
                word = name.group(1)  # \sin, \log, \infty...: left for sympy or rejected later
            out.append(word if word in ("*", "/") else f" {word} ")
            i += len(name.group(0))
        else:
            out.append({"{": "(", "}": ")", "^": "**"}.get(s[i], s[i]))
            i += 1
    expr = "".join(out)
    expr = re.sub(r"(?<=[\d)])\s*(?=[(a-zA-Z])", "*", expr)  # 2sqrt(3) -> 2*sqrt(3), 2(x) -> 2*(x)
    expr = re.sub(r"(?<=\))\s*(?=\d)", "*", expr)
    return re.sub(r"\s+", "", expr)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _evaluate(node.left), _evaluate(node.right)
        if abs(exponent) > 64 or abs(base) > 1e12:  # keep hostile inputs cheap
            raise ValueError("power too large")
        return float(base**exponent)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt":
        if len(node.args) == 1 and not node.keywords:
            return math.sqrt(_evaluate(node.args[0]))
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def to_number(normalized: str) -> float | None:
    """The value of a normalised answer that is plain arithmetic (numbers, fractions, roots, pi)."""
    if re.fullmatch(r"-?\d+(?:\.\d+)?", normalized):
        return float(normalized)
    if len(normalized) > 200:  # long answers are not plain numbers; keep hostile input cheap
        return None
    expr = latex_to_expr(normalized)
    if not expr:
        return None
    try:
        value = _evaluate(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if isinstance(value, float) and math.isfinite(value) else None


def _split_tuple(s: str) -> tuple[str, str, list[str]] | None:
    """"(1,2]" -> ("(", "]", ["1", "2"]): top-level comma split of a bracketed sequence."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts, depth, current = [], 0, []
    for ch in s[1:-1]:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return (s[0], s[-1], parts) if len(parts) > 1 else None


_SYMPY_FUNCTIONS = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "E"}
_SAFE_EXPR_RE = re.compile(r"[0-9a-zA-Z+\-*/().]+")


def _sympy_equal(a: str, b: str, max_len: int = 80) -> bool:
    """`simplify(a - b) == 0` for short expressions; False when sympy is missing or unsure."""
    if len(a) > 2 * max_len or len(b) > 2 * max_len:
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import parse_expr, standard_transformations
    except ImportError:
        return False
    exprs = [latex_to_expr(a), latex_to_expr(b)]
    for e in exprs:
        # parse_expr evaluates Python: only arithmetic on single-letter symbols and a few
        # named functions gets through, so no attribute access or call of anything else.
        if not e or len(e) > max_len or not _SAFE_EXPR_RE.fullmatch(e):
            return False
        if re.search(r"(?<!\d)\.|\.(?!\d)", e):
            return False
        if any(len(w) > 1 and w not in _SYMPY_FUNCTIONS for w in re.findall(r"[a-zA-Z]+", e)):
            return False
    try:
        local = {"ln": sympy.log, "e": sympy.E}
        x, y = (parse_expr(e, local_dict=local, transformations=standard_transformations) for e in exprs)
        return bool(sympy.simplify(x - y) == 0)
    except Exception:  # sympy raises many types on odd input; "not provably equal" is the answer
        return False


def answers_match(
    prediction: str | None, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9, symbolic: bool = True
) -> bool:
    """True when `prediction` and `reference` denote the same answer (see the module docstring)."""
    if prediction is None:
        return False
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if not p or not r:
        return False
    if p == r:
        return True
    pv, rv = to_number(p), to_number(r)
    if pv is not None and rv is not None:
        return math.isclose(pv, rv, rel_tol=rel_tol, abs_tol=abs_tol)
    pt, rt = _split_tuple(p), _split_tuple(r)
    if pt and rt:
        return (
            pt[0] == rt[0]
            and pt[1] == rt[1]
            and len(pt[2]) == len(rt[2])
            and all(answers_match(x, y, rel_tol=rel_tol, abs_tol=abs_tol, symbolic=symbolic) for x, y in zip(pt[2], rt[2]))
        )
    return symbolic and _sympy_equal(p, r)


def sympy_available() -> bool:
    try:
        import sympy  # noqa: F401
    except ImportError:
        return False
    return True


@register_reward("math")
class MathReward:
    """1 when the response's final answer equals `metadata["ground_truth"]`, else 0.

    `format_score` (default 0) is given instead of 0 when an answer was extracted but is wrong.
    A ground truth written as a whole solution ("... #### 72" or "... \\boxed{72}") is reduced
    to its final answer first.
    """

    def __init__(
        self,
        extractors: Sequence[str] = DEFAULT_EXTRACTORS,
        rel_tol: float = 1e-6,
        abs_tol: float = 1e-9,
        symbolic: bool = True,
        correct_score: float = 1.0,
        format_score: float = 0.0,
    ):
        unknown = [e for e in extractors if e not in EXTRACTORS]
        if unknown or not extractors:
            raise ValueError(f"unknown extractors {unknown}; valid: {list(EXTRACTORS)}")
        self.extractors = tuple(extractors)
        self.rel_tol, self.abs_tol, self.symbolic = rel_tol, abs_tol, symbolic
        self.correct_score, self.format_score = correct_score, format_score

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]:
        truths = metadata.get("ground_truth")
        if truths is None:
            raise ValueError("the math reward needs metadata['ground_truth']: one reference answer per response")
        if isinstance(truths, str) or len(truths) != len(responses):
            raise ValueError(
                f"metadata['ground_truth'] must be a list of {len(responses)} strings (one per response), "
                f"got {type(truths).__name__} of length {len(truths)}"
            )
        return [self.score_one(response, truth) for response, truth in zip(responses, truths)]

    def score_one(self, response: str, ground_truth: Any) -> float:
        truth = str(ground_truth)
        if "####" in truth or "\\boxed" in truth:
            truth = extract_answer(truth, ("boxed", "gsm8k")) or truth
        answer = extract_answer(response, self.extractors)
        if answer is None:
            return 0.0
        ok = answers_match(answer, truth, rel_tol=self.rel_tol, abs_tol=self.abs_tol, symbolic=self.symbolic)
        return self.correct_score if ok else self.format_score
