"""SQL views (one CREATE OR REPLACE VIEW per .sql file) and example queries (examples/)."""
