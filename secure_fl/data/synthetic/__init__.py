"""A synthetic multi-institution brain-tumour federation: the built-in default data.

Each case is a brain-like T2-FLAIR volume (an irregular ellipsoidal brain with grey/white-matter-like
texture and dark ventricles inside a zero background, as after skull stripping) holding a
FLAIR-bright tumour core inside a larger, less bright oedema of varied size, shape and position.
Labels follow BraTS: 0 background, 1 oedema, 2 core, so whole tumour is ``label > 0``.

Each site ("institution") has its own scanner and population, drawn from the seed: intensity
scale and offset, noise level, a smooth multiplicative bias field, blur, a few saturated voxels at
some sites, its own case count and its own mix of small / medium / large tumours. These are the
non-IID effects that make federated training harder than pooling, in miniature.

Everything is deterministic: the same parameters give byte-identical files, and each case depends
only on (seed, site index, case index) and the site profiles, so adding cases to a site leaves its
earlier cases unchanged.

Layout (every name stays importable from ``secure_fl.data.synthetic``): :mod:`.phantom` (site
profiles and one case) and :mod:`.federation` (the files on disk).
"""

from secure_fl.data.synthetic.federation import DATALIST_NAME as DATALIST_NAME
from secure_fl.data.synthetic.federation import DEFAULT_CASE_COUNTS, generate_federation
from secure_fl.data.synthetic.federation import MANIFEST_NAME as MANIFEST_NAME
from secure_fl.data.synthetic.phantom import (
    GENERATOR_VERSION,
    SiteProfile,
    SyntheticCase,
    site_profiles,
    synthesize_case,
)
from secure_fl.data.synthetic.phantom import ByteArray as ByteArray
from secure_fl.data.synthetic.phantom import FloatArray as FloatArray

__all__ = [
    "DEFAULT_CASE_COUNTS",
    "GENERATOR_VERSION",
    "SiteProfile",
    "SyntheticCase",
    "generate_federation",
    "site_profiles",
    "synthesize_case",
]
