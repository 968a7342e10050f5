"""Datalists: which NIfTI files make up each case, and which site (hospital) holds it.

A datalist is MONAI / Medical-Decathlon-style JSON::

    {"dataroot": "optional/base/folder",
     "training": [{"image": "a/flair.nii.gz", "label": "a/label.nii.gz", "site": "site-A",
                   "case_id": "a", "brainmask": "a/brainmask.nii.gz"}, ...]}

``image`` is the T2-FLAIR volume, ``label`` the tumour labels (whole tumour = ``label > 0``, as in
BraTS), ``brainmask`` an optional brain mask. Relative paths resolve against ``dataroot`` when the
file has one (itself relative to the JSON's folder), else against the JSON's folder.

Every check raises :class:`~secure_fl.errors.ConfigError` with a message that names the entry
(``training[3].label``) and what was expected; nothing is skipped silently.

Layout (every name stays importable from ``secure_fl.data.datalist``): :mod:`.cases` (the file
format), :mod:`.scan` (a BraTS folder to a datalist) and :mod:`.split` (sites and splits).
"""

from secure_fl.data.datalist.cases import NIFTI_SUFFIXES as NIFTI_SUFFIXES
from secure_fl.data.datalist.cases import Case, load_datalist, site_name, write_datalist
from secure_fl.data.datalist.scan import DEFAULT_SITE_PATTERN, scan_brats_folder
from secure_fl.data.datalist.split import group_by_site, split_by_site

__all__ = [
    "DEFAULT_SITE_PATTERN",
    "Case",
    "group_by_site",
    "load_datalist",
    "scan_brats_folder",
    "site_name",
    "split_by_site",
    "write_datalist",
]
