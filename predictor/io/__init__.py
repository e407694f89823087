"""Reading what users bring: FCS files, panels, sample sheets and clinical tables."""

from __future__ import annotations

from predictor.io.clinical import outcome_classes, read_clinical
from predictor.io.fcs import (
    FCSData,
    FCSHeader,
    FCSQuirkWarning,
    read_channels,
    read_fcs,
    read_fcs_header,
    write_fcs,
)
from predictor.io.panel import (
    ROLES,
    Panel,
    apply_panel,
    draft_panel,
    normalize_marker,
    panel_from_frame,
    parse_channel,
    read_panel,
    read_panel_events,
)
from predictor.io.samplesheet import SAMPLE_COLUMNS, check_cohort, read_sample_sheet

__all__ = [
    "FCSData",
    "FCSHeader",
    "FCSQuirkWarning",
    "read_channels",
    "read_fcs",
    "read_fcs_header",
    "write_fcs",
    "ROLES",
    "Panel",
    "apply_panel",
    "draft_panel",
    "normalize_marker",
    "panel_from_frame",
    "parse_channel",
    "read_panel",
    "read_panel_events",
    "SAMPLE_COLUMNS",
    "check_cohort",
    "read_sample_sheet",
    "outcome_classes",
    "read_clinical",
]
