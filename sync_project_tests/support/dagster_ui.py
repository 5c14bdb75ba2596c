"""The GraphQL the Dagster UI sends, for tests that launch and follow backfills and read an asset's
*Checks* tab as a person does."""

LAUNCH_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}
"""
BACKFILL_STATUS = """
query BackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill { status }
    ... on PythonError { message }
  }
}
"""

#: The Checks tab's query (``AssetChecksQuery`` of dagster-webserver 1.13.27, with the fields of its
#: ``AssetCheckTableFragment`` and ``AssetCheckExecutionFragment`` that decide what the tab shows): a
#: row reads "Not evaluated" while ``executionForLatestMaterialization`` is null, else the status
#: aggregated over ``partitionStatuses``.
ASSET_CHECKS = """
query AssetChecksQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      assetChecksOrError {
        ... on AssetCheckNeedsMigrationError { message }
        ... on AssetChecks {
          checks {
            name
            assetKey { path }
            description
            canExecuteIndividually
            blocking
            executionForLatestMaterialization {
              id
              runId
              status
              stepKey
              timestamp
              run { id status }
              evaluation { severity timestamp description partition }
            }
            partitionDefinition { name description }
            partitionStatuses {
              ... on AssetCheckDefaultPartitionStatuses {
                succeededPartitions
                failedPartitions
                inProgressPartitions
                skippedPartitions
                executionFailedPartitions
              }
            }
          }
        }
      }
    }
  }
}
"""
