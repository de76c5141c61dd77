"""StableHLO text for program-identity checks (tests/*_identity_worker.py)."""
import re


def strip(text: str) -> str:
    """StableHLO text without source locations (``loc(...)``, ``#loc`` lines)."""
    text = re.sub(r"^#loc.*$", "", text, flags=re.M)
    text = re.sub(r" loc\((?:[^()]|\([^()]*\))*\)", "", text)
    text = "\n".join(line for line in text.splitlines() if line.strip())
    names = {}  # private functions renumbered in order of first appearance (@_where_81 -> @_where_f3)
    return re.sub(r"@([A-Za-z_][\w]*?)_(\d+)\b", lambda m: "@%s_f%d" % (m.group(1), names.setdefault(m.group(0),
                                                                                               len(names))), text)
