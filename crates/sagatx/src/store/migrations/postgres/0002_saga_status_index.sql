CREATE INDEX sagatx_executions_saga_status ON sagatx_executions (saga, status);
