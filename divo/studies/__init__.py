"""Studies run with the library: experiments apart from it, each a resumable grid of cells on
the shared runner (:mod:`divo.studies.runner`), writing a page under docs/.

``divo study <name>``: the names and their modules are :data:`STUDIES`.
"""

from __future__ import annotations

# study name -> its module (each has ``study_command(argv) -> int``)
STUDIES = {
    "bandit": "divo.studies.bandit",
    "locomotion": "divo.studies.locomotion",
    "diffusion-ql-toy": "divo.studies.diffusion_ql_toy",
    "ogbench": "divo.studies.ogbench",
}
