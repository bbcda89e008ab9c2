"""mst_compile: Mini-Sequence Transformers as a torch.compile backend.

    model = torch.compile(model, backend="mst")

The backend is found through the `torch_dynamo_backends` entry point; importing this package
is only needed for the report API.
"""

from .declare import token_wise
from .explain import explain
from .options import MstOptions
from .report import RegionReport, Report, SkippedRegion, collect_reports, last_report

__all__ = [
    "MstOptions", "RegionReport", "Report", "SkippedRegion", "collect_reports", "explain",
    "last_report", "token_wise",
]
