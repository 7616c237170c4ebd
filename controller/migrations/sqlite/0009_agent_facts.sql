-- The inventory facts a listing of agents shows, written with each inventory so that a
-- fleet of thousands is listed without reading every inventory.
ALTER TABLE agents ADD COLUMN inventory_cpus BIGINT;
ALTER TABLE agents ADD COLUMN inventory_memory_bytes BIGINT;
ALTER TABLE agents ADD COLUMN inventory_os TEXT;
UPDATE agents SET
    inventory_cpus = CAST(json_extract(inventory, '$.cpu.logical_cpus') AS BIGINT),
    inventory_memory_bytes = CAST(json_extract(inventory, '$.memory.total_bytes') AS BIGINT),
    inventory_os = CASE WHEN json_extract(inventory, '$.os.name') IS NULL THEN NULL
        ELSE trim(json_extract(inventory, '$.os.name') || ' ' || COALESCE(json_extract(inventory, '$.os.version'), ''))
    END
WHERE inventory IS NOT NULL;
