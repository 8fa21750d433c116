-- The dashboard's summary counts from this index alone.
CREATE INDEX executions_saga_status ON executions (saga, status);
