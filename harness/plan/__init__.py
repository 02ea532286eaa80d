"""`tmath plan`: the search over a cluster's layouts (`search`), the fake-tensor dry run of a rank (`verify`,
`fakerank`), and the efficiency fitted on published runs (`published`)."""
