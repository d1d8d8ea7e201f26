"""Reporting without torch: tables, comparisons of profile rows or runs, plots and result files."""
