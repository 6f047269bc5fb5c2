"""Quality control: aggregate crowd votes into labels, model workers, plan the next votes.

One class per method on one data shape (a long frame of task, worker, label), crowd-kit style:
MajorityVote, ConfidenceTable (ImageNet 2009), DawidSkene (numpy EM, in memory or streamed),
GoldFilter (drop workers who fail known answers), AdaptiveConsensus (worker-aware posterior + stopping
rule -> accept / reject / needs k more votes). `pipeline.qc.stage.run_qc` is the I/O shell.
"""

from pipeline.qc.adaptive import AdaptiveConsensus
from pipeline.qc.base import QCInputError
from pipeline.qc.confidence_table import ConfidenceTable
from pipeline.qc.dawid_skene import DawidSkene
from pipeline.qc.gold import GoldFilter
from pipeline.qc.majority import MajorityVote

__all__ = ["AdaptiveConsensus", "ConfidenceTable", "DawidSkene", "GoldFilter", "MajorityVote", "QCInputError"]
