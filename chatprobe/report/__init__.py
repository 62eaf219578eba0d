"""Allure results, plots and the HTML report (issue 7)."""
