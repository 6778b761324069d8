"""Which tasks help or hurt each other: gradient-conflict monitoring from the per-task Gramian, TAG's
lookahead inter-task affinity, and task grouping from the affinities."""

from .grouping import Grouping, group_affinity, groupings_for_budgets, select_groups
from .plot import heatmap
from .probe import ProbeResult, TaskGradientProbe
from .stats import TaskRelations, cosine_from_gram

__all__ = ["Grouping", "ProbeResult", "TaskGradientProbe", "TaskRelations", "cosine_from_gram",
           "group_affinity", "groupings_for_budgets", "heatmap", "select_groups"]
