"""Turn sweep results (result.json files) into tables."""
