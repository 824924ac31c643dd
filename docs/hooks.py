"""MkDocs hook: links from a page to the repository's files outside `docs/`.

The pages link the examples, the scripts and the experiments' JSONs as a reader on GitHub follows them
(`../experiments/frontier/results/vanilla_frontier.json`). MkDocs only knows the files under `docs/`, so this hook
serves each linked file in the built site under `repo/`, rewrites the link to it, and logs a warning (which fails
`mkdocs build --strict`) for a link whose target does not exist. A link to a folder goes to its README.md.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repository_links")

# Inline links and images, outside code: [text](target) or ![alt](target), with an optional "#anchor".
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)


class RepositoryFile(File):
    """A file of the repository outside docs/, copied into the site as it is (never rendered as a page)."""

    def is_documentation_page(self) -> bool:
        return False


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    docs_dir = os.path.abspath(config["docs_dir"])
    root = os.path.dirname(docs_dir)
    page_dir = posixpath.dirname(page.file.src_uri)

    def relink(match: re.Match) -> str:
        url = match.group(2)
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith(("/", "#")):
            return match.group(0)
        path, hash_, anchor = url.partition("#")
        target = posixpath.normpath(posixpath.join(page_dir, path))
        if not target.startswith("../"):
            return match.group(0)  # inside docs/: MkDocs checks it
        absolute = os.path.normpath(os.path.join(docs_dir, target))
        relative = os.path.relpath(absolute, root).replace(os.sep, "/")
        if os.path.isdir(absolute) and os.path.isfile(os.path.join(absolute, "README.md")):
            relative, absolute = f"{relative}/README.md", os.path.join(absolute, "README.md")
        if relative.startswith("../") or not os.path.isfile(absolute):
            log.warning(f"Doc file '{page.file.src_uri}' links '{url}', but {relative} is not a file of the repository.")
            return match.group(0)
        uri = f"repo/{relative}"
        if files.get_file_from_path(uri) is None:
            files.append(RepositoryFile.generated(config, uri, abs_src_path=absolute))
        link = posixpath.relpath(uri, page_dir or ".")
        return f"{match.group(1)}{link}{hash_}{anchor}{match.group(3)}"

    parts = CODE.split(markdown)
    return "".join(part if i % 2 else LINK.sub(relink, part) for i, part in enumerate(parts))
