-- The inventory facts a listing of agents shows, written with each inventory so that a
-- fleet of thousands is listed without reading every inventory.
ALTER TABLE agents ADD COLUMN inventory_cpus BIGINT;
ALTER TABLE agents ADD COLUMN inventory_memory_bytes BIGINT;
ALTER TABLE agents ADD COLUMN inventory_os TEXT;
UPDATE agents SET
    inventory_cpus = CAST(CAST(inventory AS jsonb) #>> '{cpu,logical_cpus}' AS BIGINT),
    inventory_memory_bytes = CAST(CAST(inventory AS jsonb) #>> '{memory,total_bytes}' AS BIGINT),
    inventory_os = CASE WHEN CAST(inventory AS jsonb) #>> '{os,name}' IS NULL THEN NULL
        ELSE trim(CAST(inventory AS jsonb) #>> '{os,name}' || ' ' || COALESCE(CAST(inventory AS jsonb) #>> '{os,version}', ''))
    END
WHERE inventory IS NOT NULL;
